"""Synthetic videos with ground-truth motion: textured objects moving over photographs.

Used by tests, benchmarks and the demo: small, deterministic given a seed, and fast (a 64-frame
224x224 H.264 clip renders and encodes in well under a second). Each clip has 1-3 objects, each
a shape (`SHAPES`) filled with a texture (`TEXTURES`) moving in a straight line in one of eight
directions (`DIRECTIONS`, compass points, N = up), over a photograph from scikit-learn's sample
images that stays still ('static') or pans at 1-2.5 pixels per frame ('pan').

  clip = make_clip(seed=3, num_frames=64, codec='h264', bframes=2)
  clip.data                        # the encoded file (mp4; webm for vp9)
  clip.masks                       # bool [N, H, W]: pixels of moving objects, per source frame
  clip.patch_mask(frame_ids)       # bool [T, Hp, Wp] on the model grid for those source frames
  clip.labels                      # {'shape': 'disc', 'texture': 'stripes', 'direction': 'NE', ...}

The masks are per source frame; `patch_mask` maps them onto the model grid with the geometry of
`video.resize_short_side_centre_crop` (short side to `resolution`, centre crop), so they line up
with `codec.select(...).frame_ids` and positions. A patch counts as moving when moving objects
cover at least `min_coverage` of it. Objects that do not move (`moving=False`) are drawn but are
not in the masks.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Sequence

import av
import numpy as np

from data_pipeline.codec import geometry

SHAPES = ('disc', 'square', 'triangle', 'ring', 'cross')
TEXTURES = ('checker', 'stripes', 'noise', 'photo')
DIRECTIONS = ('E', 'NE', 'N', 'NW', 'W', 'SW', 'S', 'SE')
BACKGROUNDS = ('static', 'pan')
# codec option -> (PyAV encoder, container format)
CODECS = {
  'h264': ('libx264', 'mp4'),
  'hevc': ('libx265', 'mp4'),
  'vp9': ('libvpx-vp9', 'webm'),
  'mpeg4': ('mpeg4', 'mp4'),
}


@functools.lru_cache(maxsize=1)
def _photos() -> tuple:
  from sklearn.datasets import load_sample_images

  return tuple(np.ascontiguousarray(image) for image in load_sample_images().images)


@dataclasses.dataclass(frozen=True)
class MovingObject:
  shape: str
  texture: str
  direction: str  # one of DIRECTIONS, or 'none' when it does not move
  speed: float  # pixels per frame
  size: int  # side of its bounding square in pixels


@dataclasses.dataclass
class SyntheticClip:
  data: bytes  # the encoded file
  codec: str  # 'h264', 'hevc', 'vp9' or 'mpeg4'
  container: str  # 'mp4' or 'webm'
  height: int
  width: int
  num_frames: int
  fps: int
  masks: np.ndarray  # bool [N, H, W] pixels of moving objects per source frame
  objects: tuple  # MovingObject per object
  background: str  # 'static' or 'pan'
  pan: tuple  # background motion (dx, dy) in pixels per frame
  seed: int
  frames: np.ndarray | None = None  # uint8 [N, H, W, 3] as rendered (keep_frames=True)

  @property
  def labels(self) -> dict:
    """The first object's classes, as names and as ids into SHAPES / TEXTURES / DIRECTIONS."""
    first = self.objects[0]
    return dict(
      shape=first.shape,
      texture=first.texture,
      direction=first.direction,
      shape_id=SHAPES.index(first.shape),
      texture_id=TEXTURES.index(first.texture),
      direction_id=(DIRECTIONS.index(first.direction) if first.direction in DIRECTIONS else -1),
      background=self.background,
    )

  def coverage(
    self, frame_ids: Sequence[int] | None = None, resolution: int = 224, patch_size: int = 14
  ) -> np.ndarray:
    """float32 [T, Hp, Wp]: share of each model patch covered by moving objects."""
    ids = np.arange(self.num_frames) if frame_ids is None else np.asarray(frame_ids)
    ids = np.minimum(ids, self.num_frames - 1)  # past the end: the last frame, as decoding does
    ay, ax = geometry.patch_integrators(self.height, self.width, resolution, patch_size)
    covered_TxHpxWp = (ay @ self.masks[ids].astype(np.float32)) @ ax.T
    return covered_TxHpxWp / patch_size**2

  def patch_mask(
    self,
    frame_ids: Sequence[int] | None = None,
    resolution: int = 224,
    patch_size: int = 14,
    min_coverage: float = 0.1,
  ) -> np.ndarray:
    """bool [T, Hp, Wp]: patches at least `min_coverage` covered by moving objects."""
    return self.coverage(frame_ids, resolution, patch_size) >= min_coverage

  def write(self, path: str | os.PathLike) -> str:
    with open(path, 'wb') as f:
      f.write(self.data)
    return os.fspath(path)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  from PIL import Image

  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _shape_alpha(shape: str, size: int) -> np.ndarray:
  v, u = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1
  r = np.hypot(u, v)
  if shape == 'disc':
    return r <= 1
  if shape == 'square':
    return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
  if shape == 'triangle':
    return (v <= 0.9) & (np.abs(u) <= (v + 0.9) / 1.8)
  if shape == 'ring':
    return (r <= 1) & (r >= 0.45)
  if shape == 'cross':
    return ((np.abs(u) <= 0.32) | (np.abs(v) <= 0.32)) & (np.abs(u) <= 0.95) & (np.abs(v) <= 0.95)
  raise ValueError(f'shape={shape!r}: allowed values are {", ".join(SHAPES)}')


def _texture(texture: str, size: int, rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
  dark = rng.integers(0, 90, 3)
  light = rng.integers(165, 256, 3)
  yy, xx = np.mgrid[0:size, 0:size]
  if texture == 'checker':
    period = int(rng.integers(4, 10))
    on = ((yy // period + xx // period) % 2).astype(bool)
  elif texture == 'stripes':
    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 10)
    on = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0
  elif texture == 'noise':
    coarse = rng.integers(0, 256, (size // 4 + 1, size // 4 + 1, 3), dtype=np.uint8)
    return _resize(coarse, size, size)
  elif texture == 'photo':
    ph, pw = photo.shape[:2]
    top, left = int(rng.integers(0, ph - size + 1)), int(rng.integers(0, pw - size + 1))
    return photo[top : top + size, left : left + size]
  else:
    raise ValueError(f'texture={texture!r}: allowed values are {", ".join(TEXTURES)}')
  return np.where(on[..., None], light, dark).astype(np.uint8)


def _choice(name: str, value, allowed: Sequence[str], rng: np.random.Generator) -> str:
  if value is None:
    return allowed[int(rng.integers(len(allowed)))]
  if value not in allowed:
    raise ValueError(f'{name}={value!r}: allowed values are {", ".join(allowed)}')
  return value


def make_clip(
  seed: int = 0,
  *,
  num_frames: int = 64,
  height: int = 224,
  width: int = 224,
  fps: int = 25,
  codec: str = 'h264',
  bframes: int = 0,
  gop: int = 32,
  crf: int = 20,
  background: str = 'static',
  num_objects: int = 1,
  shape: str | None = None,
  texture: str | None = None,
  direction: str | None = None,
  speed: float | None = None,
  size: int | None = None,
  moving: bool = True,
  keep_frames: bool = False,
) -> SyntheticClip:
  """Render and encode one clip; everything not given is drawn from `seed`.

  codec: 'h264' (libx264), 'hevc' (libx265), 'vp9' (libvpx, webm) or 'mpeg4'; `bframes` is the
  number of consecutive B-frames (H.264, HEVC, MPEG-4; VP9 has none), `gop` the keyframe
  interval. Odd sizes are encoded 4:4:4 for H.264/HEVC (4:2:0 needs even sizes).
  shape / texture / direction / speed / size fix the first object's classes and motion.
  """
  if codec not in CODECS:
    raise ValueError(f'codec={codec!r}: allowed values are {", ".join(CODECS)}')
  if background not in BACKGROUNDS:
    raise ValueError(f'background={background!r}: allowed values are {", ".join(BACKGROUNDS)}')
  if not 1 <= num_objects <= 3:
    raise ValueError(f'num_objects={num_objects}: allowed values are 1, 2, 3')
  if num_frames < 1 or height < 8 or width < 8:
    raise ValueError(
      f'need num_frames >= 1 and a size of at least 8x8, got {num_frames} '
      f'frames of {height}x{width}'
    )
  rng = np.random.default_rng(seed)
  photos = _photos()
  which = int(rng.integers(len(photos)))
  scene, texture_photo = photos[which], photos[1 - which]
  steps = max(num_frames - 1, 1)

  # Background: a crop of the photograph, sliding for 'pan'.
  pan = (0.0, 0.0)
  if background == 'pan':
    angle = DIRECTIONS.index(_choice('pan', None, DIRECTIONS, rng)) * np.pi / 4
    pan_speed = rng.uniform(1.0, 2.5)
    pan = (pan_speed * np.cos(angle), -pan_speed * np.sin(angle))
  need_h = height + int(np.ceil(abs(pan[1]) * steps)) + 1
  need_w = width + int(np.ceil(abs(pan[0]) * steps)) + 1
  scale = max(need_h / scene.shape[0], need_w / scene.shape[1]) * rng.uniform(1.0, 1.25)
  scene = _resize(scene, int(np.ceil(scene.shape[0] * scale)), int(np.ceil(scene.shape[1] * scale)))
  origin_y = rng.integers(0, scene.shape[0] - need_h + 1) + (
    abs(pan[1]) * steps if pan[1] < 0 else 0
  )
  origin_x = rng.integers(0, scene.shape[1] - need_w + 1) + (
    abs(pan[0]) * steps if pan[0] < 0 else 0
  )

  # Objects: a textured sprite each, on a straight path kept inside the frame.
  short = min(height, width)
  objects, sprites, paths = [], [], []
  for k in range(num_objects):
    first = k == 0
    side = int(
      size if (first and size) else rng.integers(max(6, short // 5), max(7, int(short / 3.2)))
    )
    side = min(side, short - 2)
    obj_shape = _choice('shape', shape if first else None, SHAPES, rng)
    obj_texture = _choice('texture', texture if first else None, TEXTURES, rng)
    obj_direction = _choice('direction', direction if first else None, DIRECTIONS, rng)
    angle = DIRECTIONS.index(obj_direction) * np.pi / 4
    unit = np.array([np.cos(angle), -np.sin(angle)])
    obj_speed = float(speed if (first and speed is not None) else rng.uniform(1.5, 3.0))
    if not moving:
      obj_speed, obj_direction = 0.0, 'none'
    # Keep the whole path inside the frame: cap the speed by the room along each axis.
    room = np.array([width - side - 2, height - side - 2], np.float64)
    with np.errstate(divide='ignore'):
      cap = np.min(np.where(np.abs(unit) > 1e-9, room / (np.abs(unit) * steps), np.inf))
    obj_speed = float(min(obj_speed, cap))
    velocity = unit * obj_speed
    half_travel = np.abs(velocity) * (num_frames - 1) / 2
    low = side / 2 + 1 + half_travel
    high = np.array([width, height]) - side / 2 - 1 - half_travel
    middle = low + rng.uniform(0, 1, 2) * np.maximum(high - low, 0)
    objects.append(MovingObject(obj_shape, obj_texture, obj_direction, obj_speed, side))
    sprites.append((_shape_alpha(obj_shape, side), _texture(obj_texture, side, rng, texture_photo)))
    paths.append((middle, velocity))

  frames = np.empty((num_frames, height, width, 3), np.uint8)
  masks = np.zeros((num_frames, height, width), bool)
  for t in range(num_frames):
    oy = int(round(origin_y + pan[1] * t))
    ox = int(round(origin_x + pan[0] * t))
    frame = frames[t]
    frame[...] = scene[oy : oy + height, ox : ox + width]
    for obj, (alpha, texture_rgb), (middle, velocity) in zip(objects, sprites, paths):
      centre = middle + velocity * (t - (num_frames - 1) / 2)
      x0 = int(round(centre[0] - obj.size / 2))
      y0 = int(round(centre[1] - obj.size / 2))
      ys, xs = (
        slice(max(y0, 0), min(y0 + obj.size, height)),
        slice(max(x0, 0), min(x0 + obj.size, width)),
      )
      a = alpha[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
      region = frame[ys, xs]
      region[a] = texture_rgb[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0][a]
      if obj.speed > 0:
        masks[t, ys, xs] |= a

  data = encode(frames, codec=codec, fps=fps, bframes=bframes, gop=gop, crf=crf)
  return SyntheticClip(
    data=data,
    codec=codec,
    container=CODECS[codec][1],
    height=height,
    width=width,
    num_frames=num_frames,
    fps=fps,
    masks=masks,
    objects=tuple(objects),
    background=background,
    pan=tuple(float(p) for p in pan),
    seed=seed,
    frames=frames if keep_frames else None,
  )


def encode(
  frames_NxHxWx3: np.ndarray,
  codec: str = 'h264',
  fps: int = 25,
  bframes: int = 0,
  gop: int = 32,
  crf: int = 20,
) -> bytes:
  """Encode RGB frames with PyAV into an mp4 (webm for vp9), returning the file's bytes."""
  if codec not in CODECS:
    raise ValueError(f'codec={codec!r}: allowed values are {", ".join(CODECS)}')
  encoder, container_format = CODECS[codec]
  _, height, width, _ = frames_NxHxWx3.shape
  odd = height % 2 or width % 2
  buffer = io.BytesIO()
  # bitexact: no random ids (WebM writes a random segment UID) or version strings in the file.
  container = av.open(buffer, mode='w', format=container_format, options={'fflags': '+bitexact'})
  stream = container.add_stream(encoder, rate=fps)
  stream.width, stream.height = width, height
  stream.pix_fmt = 'yuv444p' if odd and codec in ('h264', 'hevc') else 'yuv420p'
  stream.codec_context.gop_size = gop
  if codec == 'h264':
    # b-adapt=0: always the requested number of B-frames, so tests can rely on them.
    # mbtree=0: x264's macroblock-tree with B-frames gives different bytes now and then from
    # run to run; a seed must always give the same file. threads=1: output independent of
    # the machine.
    stream.options = {
      'preset': 'veryfast',
      'crf': str(crf),
      'x264-params': f'keyint={gop}:min-keyint={gop}:scenecut=0:'
      f'bframes={bframes}:b-adapt=0:mbtree=0:threads=1:'
      f'lookahead-threads=1',
    }
  elif codec == 'hevc':
    stream.options = {
      'preset': 'ultrafast',
      'crf': str(crf),
      'x265-params': f'log-level=none:keyint={gop}:min-keyint={gop}:'
      f'scenecut=0:bframes={bframes}:pools=1:frame-threads=1',
    }
  elif codec == 'vp9':
    stream.options = {
      'deadline': 'realtime',
      'cpu-used': '8',
      'lag-in-frames': '0',
      'crf': str(min(63, crf + 12)),
      'b': '0',
      'threads': '1',
    }
  else:  # mpeg4
    stream.codec_context.max_b_frames = bframes
    stream.bit_rate = int(width * height * fps)  # about 1 bit per pixel
  for frame_rgb in frames_NxHxWx3:
    for packet in stream.encode(av.VideoFrame.from_ndarray(frame_rgb, format='rgb24')):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  return buffer.getvalue()


def write_audio_only(path, num_frames: int = 8, sample_rate: int = 16000) -> str:
  """An AAC file with no video stream: silence, for tests of bad-input handling."""
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('aac', rate=sample_rate)
    stream.layout = 'mono'
    for i in range(num_frames):
      frame = av.AudioFrame.from_ndarray(
        np.zeros((1, 1024), np.float32), format='fltp', layout='mono'
      )
      frame.sample_rate, frame.pts = sample_rate, i * 1024
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return str(path)
