"""Pictures of a codec selection: kept patches outlined over dimmed frames, score heatmaps, PNG
grids and animated GIFs (numpy and PIL only). `ove-visualize-selection` and the demo draw with it.
"""

from __future__ import annotations

import os

import numpy as np

PICTURE_TYPES = ('?', 'I', 'P', 'B')  # the codes of data_pipeline.records
OUTLINE = np.array([255, 214, 0], np.uint8)
# A perceptually ordered ramp (dark blue -> purple -> orange -> pale yellow), like "inferno";
# pillow has no colour maps and matplotlib is not a dependency.
RAMP = np.array(
  [
    [0, 0, 4],
    [40, 11, 84],
    [101, 21, 110],
    [159, 42, 99],
    [212, 72, 66],
    [245, 125, 21],
    [250, 193, 39],
    [252, 255, 164],
  ],
  np.float32,
)


def kept_mask(positions_Kx3: np.ndarray, num_frames: int, grid: int) -> np.ndarray:
  """bool [T, grid, grid]: which patches are selected."""
  mask = np.zeros((num_frames, grid, grid), bool)
  p = np.asarray(positions_Kx3, np.int64).reshape(-1, 3)
  mask[p[:, 0], p[:, 1], p[:, 2]] = True
  return mask


def overlay(frames_TxHxWx3: np.ndarray, mask_TxGxG: np.ndarray, dim: float = 0.3) -> np.ndarray:
  """Kept patches as they are with a one-pixel outline around kept regions; the rest dimmed."""
  t, h, w, _ = frames_TxHxWx3.shape
  patch = h // mask_TxGxG.shape[1]
  pixels = mask_TxGxG.repeat(patch, 1).repeat(patch, 2)[:, :h, :w]
  out = np.where(
    pixels[..., None], frames_TxHxWx3, (frames_TxHxWx3.astype(np.float32) * dim).astype(np.uint8)
  )
  # Outline the border of the kept region (not every patch: 2048 boxes would hide the image).
  padded = np.pad(pixels, ((0, 0), (1, 1), (1, 1)), constant_values=False)
  interior = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
  out[pixels & ~interior] = OUTLINE
  return out


def colorize(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB through the ramp."""
  x = np.clip(values, 0.0, 1.0) * (len(RAMP) - 1)
  low = np.floor(x).astype(np.int64).clip(0, len(RAMP) - 2)
  frac = (x - low)[..., None]
  return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).round().astype(np.uint8)


def heatmap(
  frames_TxHxWx3: np.ndarray, scores_TxGxG: np.ndarray, alpha: float = 0.65
) -> np.ndarray:
  """The score map (normalised over the clip) blended over grey frames."""
  t, h, w, _ = frames_TxHxWx3.shape
  scores = np.asarray(scores_TxGxG, np.float32)
  top = float(scores.max()) if scores.size else 0.0
  norm = scores / top if top > 0 else np.zeros_like(scores)
  patch = h // scores.shape[1]
  colors = colorize(norm.repeat(patch, 1).repeat(patch, 2)[:, :h, :w]).astype(np.float32)
  grey = frames_TxHxWx3.astype(np.float32).mean(-1, keepdims=True)
  return (alpha * colors + (1 - alpha) * grey).round().clip(0, 255).astype(np.uint8)


def _captioned(image: np.ndarray, caption: str):
  from PIL import Image, ImageDraw

  h, w, _ = image.shape
  canvas = Image.new('RGB', (w, h + 14), (0, 0, 0))
  canvas.paste(Image.fromarray(image), (0, 0))
  ImageDraw.Draw(canvas).text((2, h + 1), caption, fill=(255, 255, 255))
  return canvas


def save_grid(images: np.ndarray, captions, path: str, cols: int = 8, gap: int = 2) -> None:
  from PIL import Image

  tiles = [_captioned(im, c) for im, c in zip(images, captions)]
  cols = max(1, min(cols, len(tiles)))
  rows = -(-len(tiles) // cols)
  tw, th = tiles[0].size
  sheet = Image.new('RGB', (cols * (tw + gap) - gap, rows * (th + gap) - gap), (40, 40, 40))
  for i, tile in enumerate(tiles):
    sheet.paste(tile, ((i % cols) * (tw + gap), (i // cols) * (th + gap)))
  sheet.save(path)


def save_gif(images: np.ndarray, captions, path: str, frame_ms: int = 120) -> None:
  tiles = [_captioned(im, c) for im, c in zip(images, captions)]
  tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=frame_ms, loop=0)


def render(
  frames: np.ndarray,
  frame_ids,
  positions,
  picture_types,
  out_dir: str,
  patch_size: int = 14,
  scores=None,
  cols: int = 8,
  frame_ms: int = 120,
) -> dict[str, str]:
  """Writes selection.png, selection.gif (and heatmap.png with scores); returns their paths."""
  t, h, _, _ = frames.shape
  grid = h // patch_size
  mask = kept_mask(positions, t, grid)
  codes = np.asarray(picture_types).reshape(-1)
  captions = [
    f't{i} f{int(frame_ids[i])} {PICTURE_TYPES[int(codes[i])] if i < len(codes) else "?"}'
    f' {int(mask[i].sum())}/{grid * grid}'
    for i in range(t)
  ]
  shown = overlay(frames, mask)
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    'png': os.path.join(out_dir, 'selection.png'),
    'gif': os.path.join(out_dir, 'selection.gif'),
  }
  save_grid(shown, captions, paths['png'], cols)
  save_gif(shown, captions, paths['gif'], frame_ms)
  if scores is not None:
    paths['heatmap'] = os.path.join(out_dir, 'heatmap.png')
    save_grid(heatmap(frames, scores), captions, paths['heatmap'], cols)
  return paths
