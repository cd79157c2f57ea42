"""The Grain input pipeline: packing, video modes, host sharding, exact restore, bad records.

The data is made here: short H.264 clips of a moving square (PyAV), PNG images (pillow), written
as `data_pipeline.records` payloads into ArrayRecord shards.
"""

import dataclasses
import io
import json
import logging

import av
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from data_pipeline import packing, pipeline, records, sources, transforms
from data_pipeline import video as video_lib

P = transforms.PATCH_DIM
CLIP_FRAMES = 24  # frames in each synthetic clip
TIMELINE = 64  # frame_ids per record: the usual 64-frame timeline (repeats frames here)


# ------------------------------------------------------------------------------------------------
# Tiny dataset
# ------------------------------------------------------------------------------------------------


def encode_clip(seed: int, num_frames: int = CLIP_FRAMES, size: int = 64) -> bytes:
  """H.264 mp4 bytes: a coloured square moving over a gradient, different in every frame."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  background = np.stack([xx * 3, yy * 3, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)
  colour = rng.integers(64, 256, 3).astype(np.uint8)
  buffer = io.BytesIO()
  with av.open(buffer, mode='w', format='mp4') as container:
    stream = container.add_stream('libx264', rate=25)
    stream.width = stream.height = size
    stream.pix_fmt = 'yuv420p'
    stream.options = {
      'x264-params': 'keyint=8:min-keyint=8:scenecut=0:bframes=0:ref=1',
      'preset': 'ultrafast',
      'crf': '12',
    }
    for i in range(num_frames):
      frame = background.copy()
      y, x = (2 * i + 5 * seed) % (size - 16), (3 * i) % (size - 16)
      frame[y : y + 16, x : x + 16] = colour
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buffer.getvalue()


def clip_record(seed: int, num_selected: int, timeline: int = TIMELINE, video: bytes | None = None):
  rng = np.random.default_rng(100 + seed)
  flat = np.sort(rng.choice(timeline * 256, num_selected, replace=False))
  positions = np.stack([flat // 256, (flat // 16) % 16, flat % 16], -1).astype(np.int16)
  return {
    'source': f'clip{seed}.mp4',
    'video': encode_clip(seed) if video is None else video,
    'frame_ids': np.floor(np.linspace(0, CLIP_FRAMES - 1, timeline)).astype(np.int32),
    'positions': positions,
    'picture_types': np.zeros(timeline, np.uint8),
    'labels': rng.integers(0, 400_000, 10).astype(np.int32),
  }


def png_record(seed: int, height: int = 40, width: int = 56):
  rng = np.random.default_rng(200 + seed)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  # Three labels, so the head's ten are a cyclic padding.
  return {'image': buffer.getvalue(), 'labels': rng.integers(0, 2_000_000, 3).astype(np.int32)}


def write_shards(path_prefix, payloads, num_shards=2):
  """Contiguous runs of payloads per shard, so a payload's list index is its source index."""
  for s, chunk in enumerate(np.array_split(np.arange(len(payloads)), num_shards)):
    writer = array_record_module.ArrayRecordWriter(
      f'{path_prefix}-{s:05d}-of-{num_shards:05d}.array_record', 'group_size:1'
    )
    for i in chunk:
      writer.write(payloads[i])
    writer.close()
  return f'{path_prefix}-*.array_record'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline_data')
  clips = [clip_record(seed, num_selected=100 + 40 * seed) for seed in range(6)]
  corrupt_video = clip_record(6, 50, video=encode_clip(6)[:300])  # truncated in the header
  videos = [records.encode(c) for c in clips]
  videos.insert(3, records.encode(corrupt_video))
  videos.insert(5, b'this is not an npz record')
  images = [records.encode(png_record(seed)) for seed in range(13)]
  images.insert(7, records.encode({'image': b'\x89PNG garbage', 'labels': np.arange(3)}))
  return {
    'clips': clips,
    'video_glob': write_shards(str(root / 'video'), videos),
    'image_glob': write_shards(str(root / 'image'), images, num_shards=3),
    'num_videos': len(videos),
    'bad_videos': {3, 5},
    'num_images': len(images),
    'bad_images': {7},
  }


def _config(data, **overrides):
  heads = {
    'image': pipeline.HeadConfig(
      kind='image',
      source=data['image_glob'],
      rows=2,
      tokens_per_row=256,
      max_segments=4,
      resolution=112,
    ),
    'video': pipeline.HeadConfig(
      kind='video', source=data['video_glob'], rows=2, tokens_per_row=2048, max_segments=3
    ),
  }
  heads = {name: heads[name] for name in overrides.pop('heads', heads)}
  return pipeline.PipelineConfig(heads=heads, **{'worker_count': 0, **overrides})


def _valid_indices(batches):
  return [int(i) for b in batches for i in b['sample_index'][b['segment_valid']]]


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def _sample(i, n, num_labels=2):
  rng = np.random.default_rng(i)
  return {
    'patches': rng.integers(0, 256, (n, P), dtype=np.uint8),
    'positions': rng.integers(0, 64, (n, 3)).astype(np.int32),
    'labels': np.full(num_labels, 10 * i, np.int32),
    'mode': transforms.MODE_IMAGE,
    'index': i,
    'name': f'sample-{i}',
  }


def test_packing_first_fit_keeps_samples_whole_and_in_place():
  lengths = [6, 5, 4, 3, 2, 1, 7]
  samples = [_sample(i, n) for i, n in enumerate(lengths)]
  batches = packing.pack(samples, rows=2, tokens_per_row=10, max_segments=3, num_labels=2)
  # First fit by hand: 6->row 0; 5->row 1; 4->row 0 (full); 3->row 1; 2->row 1 (full); 1 fits
  # nowhere, so it opens batch 2 (row 0), and 7 joins it there.
  expected = [[[0, 2], [1, 3, 4]], [[5, 6], []]]
  assert len(batches) == 2
  for batch, rows in zip(batches, expected):
    assert batch['patches'].shape == (2, 10, P) and batch['patches'].dtype == np.float32
    assert batch['positions'].shape == (2, 10, 3) and batch['segment_ids'].shape == (2, 10)
    assert batch['labels'].shape == (2, 3, 2)
    for r, members in enumerate(rows):
      seg_ids = batch['segment_ids'][r]
      start = 0
      for s, i in enumerate(members):
        n = lengths[i]
        # Contiguous, segment ids 1..S in arrival order, content and positions as the sample's.
        np.testing.assert_array_equal(seg_ids[start : start + n], s + 1)
        np.testing.assert_array_equal(
          batch['patches'][r, start : start + n], transforms.normalise(samples[i]['patches'])
        )
        np.testing.assert_array_equal(
          batch['positions'][r, start : start + n], samples[i]['positions']
        )
        np.testing.assert_array_equal(batch['labels'][r, s], samples[i]['labels'])
        assert batch['sample_index'][r, s] == i and batch['segment_valid'][r, s]
        start += n
      assert (seg_ids[start:] == 0).all()
      assert (batch['patches'][r, start:] == 0).all() and (batch['positions'][r, start:] == 0).all()
      assert not batch['segment_valid'][r, len(members) :].any()
      assert (batch['sample_index'][r, len(members) :] == -1).all()


def test_packing_max_segments_uint8_and_too_long():
  samples = [_sample(i, 1) for i in range(5)]
  (batch,) = packing.pack(
    samples, rows=3, tokens_per_row=8, max_segments=2, num_labels=2, patch_dtype='uint8'
  )
  # Two segments per row at most, though tokens would allow eight.
  np.testing.assert_array_equal(batch['segment_ids'][:, :2], [[1, 2], [1, 2], [1, 0]])
  assert batch['patches'].dtype == np.uint8
  np.testing.assert_array_equal(batch['patches'][2, 0], samples[4]['patches'][0])
  with pytest.raises(packing.SampleTooLongError, match='sample-9'):
    packing.pack([_sample(9, 9)], rows=1, tokens_per_row=8, max_segments=2, num_labels=2)


def test_normalise_is_clip():
  patch = np.arange(P, dtype=np.int64).astype(np.uint8)
  pixels = patch.reshape(14, 14, 3).astype(np.float64) / 255
  expected = (pixels - np.asarray(transforms.CLIP_MEAN)) / np.asarray(transforms.CLIP_STD)
  np.testing.assert_allclose(transforms.normalise(patch), expected.reshape(P), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Video modes
# ------------------------------------------------------------------------------------------------


def _manual_patch(frame, h, w):
  return frame[14 * h : 14 * h + 14, 14 * w : 14 * w + 14].reshape(P)


def test_codec_mode_gathers_exactly_the_selected_patches(data, monkeypatch):
  record = data['clips'][2]
  decoded = []
  real_decode = video_lib.decode_frames

  def spy(video, frame_ids, resolution=224):
    decoded.append(list(frame_ids))
    return real_decode(video, frame_ids, resolution)

  monkeypatch.setattr(video_lib, 'decode_frames', spy)

  sample = transforms.VideoTransform(mode_probs=(1, 0, 0))(record, np.random.default_rng(0))
  assert sample['mode'] == transforms.MODE_CODEC
  t, h, w = record['positions'].astype(np.int64).T
  # Only the frames the selection uses were decoded.
  assert decoded == [list(record['frame_ids'][np.unique(t)])]
  frames = real_decode(record['video'], record['frame_ids'], 224)
  expected = np.stack([_manual_patch(frames[ti], hi, wi) for ti, hi, wi in zip(t, h, w)])
  np.testing.assert_array_equal(sample['patches'], expected)
  np.testing.assert_array_equal(sample['positions'], record['positions'])  # T = 64: t as stored

  # A 16-frame timeline: t = j sits at floor(linspace(0, 63, 16))[j] on the 64-frame grid.
  short = clip_record(2, 60, timeline=16, video=record['video'])
  sample = transforms.VideoTransform(mode_probs=(1, 0, 0))(short, np.random.default_rng(0))
  t16 = short['positions'][:, 0].astype(np.int64)
  np.testing.assert_array_equal(sample['positions'][:, 0], np.floor(t16 * 63 / 15))
  np.testing.assert_array_equal(sample['positions'][:, 1:], short['positions'][:, 1:])


def test_uniform_frames_at_true_t_and_collage_of_the_same_frames(data):
  record = data['clips'][1]
  frame_ids = record['frame_ids']
  uniform = transforms.VideoTransform(mode_probs=(0, 1, 0))(record, np.random.default_rng(7))
  collage = transforms.VideoTransform(mode_probs=(0, 0, 1))(record, np.random.default_rng(7))
  assert uniform['mode'] == transforms.MODE_UNIFORM and collage['mode'] == transforms.MODE_COLLAGE
  assert uniform['patches'].shape == collage['patches'].shape == (8 * 256, P)

  hh, ww = np.meshgrid(np.arange(16), np.arange(16), indexing='ij')
  frames = []
  for b in range(8):
    block = uniform['positions'][256 * b : 256 * (b + 1)]
    t = int(block[0, 0])
    assert 8 * b <= t < 8 * b + 8 and (block[:, 0] == t).all()  # one frame per bin of 8
    np.testing.assert_array_equal(block[:, 1], hh.reshape(-1))
    np.testing.assert_array_equal(block[:, 2], ww.reshape(-1))
    (frame,) = video_lib.decode_frames(record['video'], [frame_ids[t]], 224)
    expected = np.stack(
      [_manual_patch(frame, h, w) for h, w in zip(hh.reshape(-1), ww.reshape(-1))]
    )
    np.testing.assert_array_equal(uniform['patches'][256 * b : 256 * (b + 1)], expected)
    frames.append(frame)

  # Collage: the same eight frames stacked into one 1792 x 224 image, t = 0, 128 x 16 grid.
  tall = np.concatenate(frames, axis=0)
  assert tall.shape == (1792, 224, 3)
  ch, cw = np.meshgrid(np.arange(128), np.arange(16), indexing='ij')
  np.testing.assert_array_equal(
    collage['positions'], np.stack([np.zeros(2048), ch.reshape(-1), cw.reshape(-1)], -1)
  )
  expected = np.stack([_manual_patch(tall, h, w) for h, w in zip(ch.reshape(-1), cw.reshape(-1))])
  np.testing.assert_array_equal(collage['patches'], expected)


def test_video_mode_ratios_follow_config():
  vt = transforms.VideoTransform()
  modes = [vt.choose_mode(np.random.default_rng(i)) for i in range(4000)]
  shares = [modes.count(m) / len(modes) for m in transforms.VIDEO_MODES]
  np.testing.assert_allclose(shares, [0.5, 0.375, 0.125, 0.0], atol=0.03)  # no random mode


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def test_image_transforms():
  record = png_record(0, height=60, width=90)
  image = transforms.ImageTransform(resolution=112)(record, np.random.default_rng(0))
  assert image['patches'].shape == (64, P) and image['patches'].dtype == np.uint8
  np.testing.assert_array_equal(image['positions'], transforms.grid_positions(0, 8, 8))
  np.testing.assert_array_equal(image['labels'], np.resize(record['labels'], 10))

  # OCR: 448, short side resize + centre crop, no flip, 100 labels cycling through the record's.
  ocr = pipeline.HeadConfig(kind='ocr', source='unused').transform()
  sample = ocr(record, np.random.default_rng(0))
  assert sample['patches'].shape == (32 * 32, P)
  expected = np.asarray(
    Image.open(io.BytesIO(record['image']))
    .convert('RGB')
    .resize((448, 448), Image.Resampling.BICUBIC, box=(15, 0, 75, 60))
  )
  np.testing.assert_array_equal(sample['patches'], transforms.to_patches(expected))
  assert sample['labels'].shape == (100,)
  np.testing.assert_array_equal(sample['labels'][:6], np.tile(record['labels'], 2))

  # Native aspect: a 3:2 grid within the token budget.
  native = transforms.ImageTransform(native_aspect=True, max_tokens=100, crop='resize')
  sample = native(record, np.random.default_rng(0))
  hp, wp = sample['positions'][:, 1].max() + 1, sample['positions'][:, 2].max() + 1
  assert (hp, wp) == (8, 12) and len(sample['patches']) == 96


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------


def test_two_hosts_cover_each_epoch_exactly_once(data):
  n = data['num_images']
  good = set(range(n)) - data['bad_images']
  # Two epochs of samples: global position p = i + 2k on host i; epoch = p // n.
  per_epoch = [[], []]
  for i in range(2):
    cfg = _config(data, heads=['image'], num_epochs=2, process_index=i, process_count=2)
    ds = pipeline.sample_dataset('image', cfg.heads['image'], cfg)
    for k in range(len(ds)):
      sample = ds[k]
      index = sample.get('index', -1)  # skipped records carry no index
      per_epoch[(i + 2 * k) // n].append(index)
  for epoch in per_epoch:
    assert len(epoch) == n
    assert sorted(i for i in epoch if i >= 0) == sorted(good)  # no overlap, no gap
  assert per_epoch[0] != per_epoch[1]  # reshuffled

  # The same through packing: the two hosts' batches hold every good record once.
  seen = []
  for i in range(2):
    cfg = _config(data, heads=['image'], num_epochs=1, process_index=i, process_count=2)
    batches = [b['image'] for b in pipeline.make_iterator(cfg)]
    # Rows are filled: 4 images of 64 tokens per 256-token row, except in the last batch.
    assert all(b['segment_valid'].all() for b in batches[:-1])
    seen.append(_valid_indices(batches))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(good)


def test_corrupt_records_are_skipped_counted_and_logged(data, caplog):
  for head, bad, total in (
    ('video', data['bad_videos'], data['num_videos']),
    ('image', data['bad_images'], data['num_images']),
  ):
    cfg = _config(data, heads=[head], num_epochs=1)
    with caplog.at_level(logging.WARNING, logger='data_pipeline.pipeline'):
      batches = [step[head] for step in pipeline.make_iterator(cfg)]
    assert sum(int(b['num_skipped']) for b in batches) == len(bad)
    assert sorted(_valid_indices(batches)) == sorted(set(range(total)) - bad)
  messages = '\n'.join(r.getMessage() for r in caplog.records)
  src = sources.open_source(data['video_glob'])
  for index in data['bad_videos']:
    assert src.name(index) in messages  # the warning names the shard and record
  assert 'VideoError' in messages


def test_restore_with_workers_is_bit_exact(data):
  cfg = _config(data, worker_count=2, mixing='weighted', seed=3)
  it = pipeline.make_iterator(cfg)
  saved, reference = None, []
  for step in range(7):
    if step == 3:
      saved = json.dumps(it.get_state())  # what orbax's grain CheckpointSave writes
    reference.append(next(it))
  it.close()
  assert {h for r in reference for h in r} == {'image', 'video'}

  restored = pipeline.make_iterator(cfg)
  restored.set_state(json.loads(saved))
  resumed = [next(restored) for _ in range(4)]
  restored.close()
  for want, got in zip(reference[3:], resumed):
    assert want.keys() == got.keys()
    for head in want:
      assert want[head].keys() == got[head].keys()
      for field in want[head]:
        np.testing.assert_array_equal(got[head][field], want[head][field], err_msg=field)
  # Not trivially equal: the resumed batches are not the run's first ones.
  first = reference[0]
  assert any(
    not np.array_equal(first[h]['sample_index'], resumed[0][h]['sample_index'])
    for h in first
    if h in resumed[0]
  )


def test_another_host_count_goes_on_from_the_global_record_count(data):
  one = _config(data, heads=['image'], process_index=0, process_count=1)
  records = pipeline.sample_dataset('image', one.heads['image'], one)  # repeats forever
  order = [int(records[k].get('index', -1)) for k in range(8 * data['num_images'])]
  it = pipeline.make_iterator(one)
  seen = _valid_indices([next(it)['image'] for _ in range(3)])
  saved = it.get_state()
  read = pipeline.records_read(saved)['image']
  assert read >= len(seen) and set(seen) <= set(order[:read])
  # Two hosts (the resumed run): host j reads global positions j, j + 2, ... from the first at or
  # after `read`, so together they go on with the global order where the one host stopped.
  for j in range(2):
    cfg = _config(data, heads=['image'], process_index=j, process_count=2)
    host = pipeline.make_iterator(cfg)
    state = pipeline.state_after(host.get_state(), {'image': read}, j, 2, draws=3)
    assert state['step'] == 3
    host.set_state(state)
    got = _valid_indices([next(host)['image']])
    first = read + (read + j) % 2  # the first position of host j at or after `read`
    want = [order[p] for p in range(first, first + 4 * len(got), 2) if order[p] >= 0]
    assert got and sorted(got) == sorted(want[: len(got)]), (j, read)

  # Input workers: each reads every W-th record of its host's share.
  workers = {
    'step': 0,
    'heads': {
      'image': {
        'next_index_in_cycle': 0,
        'iterators_in_use_states': [{'parent': {'next_index': 0}}, {'parent': {'next_index': 0}}],
      }
    },
  }
  moved = pipeline.state_after(workers, {'image': 11}, 1, 2, draws=0)  # host 1 of 2: 5 records
  assert [
    w['parent']['next_index'] for w in moved['heads']['image']['iterators_in_use_states']
  ] == [3, 2]
  assert pipeline.records_read(moved) == {'image': 5}


def test_config_from_dict_and_errors(data):
  cfg = pipeline.PipelineConfig.from_dict(
    {
      'seed': 1,
      'heads': {'ocr': {'kind': 'ocr', 'source': data['image_glob'], 'area_range': [0.5, 1.0]}},
    }
  )
  assert cfg.heads['ocr'].get('num_labels') == 100 and cfg.heads['ocr'].area_range == (0.5, 1.0)
  with pytest.raises(ValueError, match='unknown'):
    pipeline.PipelineConfig.from_dict({'heads': {}, 'sede': 1})
  with pytest.raises(ValueError, match='kind'):
    pipeline.HeadConfig(kind='audio', source='x')
  with pytest.raises(FileNotFoundError):
    sources.open_source('/nonexistent/*.array_record')


class _BrokenSource:
  """Every record is garbage: a wrong path or format, not a few corrupt files."""

  def __len__(self):
    return 50

  def __getitem__(self, index):
    return {'index': int(index), 'name': f'broken#{index}', 'raw': b'garbage'}


def test_a_source_of_only_bad_records_is_an_error(data):
  cfg = _config(data, heads=['image'], max_consecutive_skips=5)
  it = iter(pipeline.build(cfg, sources_by_head={'image': _BrokenSource()}))
  try:
    with pytest.raises(RuntimeError, match='5 records in a row'):
      next(it)
  finally:
    # Its reader threads would go on logging skipped records after this test has ended.
    it.close()


def test_records_without_labels_are_refused_when_opened(tmp_path):
  """A codec precompute's records (no `labels` yet) given as a head's source: one SourceError
  naming the head, the record and the labels tool when the pipeline is made, not a thousand
  skipped samples at the first step. A corrupt first record is left to the skip counter."""
  unlabelled = [clip_record(s, 60) for s in range(3)]
  for record in unlabelled:
    del record['labels']
  glob = write_shards(str(tmp_path / 'codec'), [records.encode(r) for r in unlabelled], 1)
  data = {'video_glob': glob, 'image_glob': ''}
  for call in (pipeline.check_sources, pipeline.make_iterator):
    with pytest.raises(pipeline.SourceError, match='no `labels` field') as e:
      call(_config(data, heads=['video']))
    assert e.value.head == 'video' and 'codec-00000-of-00001.array_record#0' in str(e.value)
    assert 'ove-cluster-labels' in str(e.value)
  # The same records with labels open; so do ones whose first record is corrupt.
  labelled = [records.encode(clip_record(s, 60)) for s in range(3)]
  for payloads, name in ((labelled, 'ok'), ([b'not a record', *labelled], 'corrupt_first')):
    data['video_glob'] = write_shards(str(tmp_path / name), payloads, 1)
    assert pipeline.check_sources(_config(data, heads=['video'])) == {'video': len(payloads)}


def test_a_corrupt_record_is_skipped_every_epoch_and_logged_once(tmp_path, caplog):
  folder = tmp_path / 'cat'
  folder.mkdir()
  for i in range(3):
    (folder / f'{i}.png').write_bytes(png_record(i)['image'])
  (folder / 'bad.png').write_bytes(b'not a picture')
  head = pipeline.HeadConfig(
    kind='image', source=f'folder:{tmp_path}', rows=2, tokens_per_row=256, resolution=112
  )
  cfg = pipeline.PipelineConfig(heads={'images': head}, num_epochs=3, worker_count=0)
  with caplog.at_level('WARNING', logger='data_pipeline.pipeline'):
    batches = [step['images'] for step in pipeline.make_iterator(cfg)]
  assert len(_valid_indices(batches)) == 9  # the three good images, three epochs
  # This head's only: an iterator of another test may still be reading in the background.
  warned = [r.getMessage() for r in caplog.records if '[images] skipping record' in r.getMessage()]
  assert len(warned) == 1 and 'bad.png' in warned[0], warned
  assert 'BytesIO' not in warned[0] and 'its bytes' in warned[0]


def test_image_folder_and_tfds_sources(tmp_path):
  for i in range(5):
    folder = tmp_path / 'images' / ('cat' if i % 2 else 'dog')
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{i}.png').write_bytes(png_record(i)['image'])
  src = sources.open_source(f'folder:{tmp_path / "images"}')
  assert len(src) == 5 and src.files[0] == 'cat/1.png'
  assert [int(src[i]['raw']['labels'][0]) for i in range(5)] == [0, 0, 1, 1, 1]
  head = pipeline.HeadConfig(
    kind='image',
    source=f'folder:{tmp_path / "images"}',
    rows=2,
    tokens_per_row=256,
    max_segments=4,
    resolution=112,
  )
  cfg = pipeline.PipelineConfig(heads={'images': head}, num_epochs=1, worker_count=0)
  batches = [step['images'] for step in pipeline.make_iterator(cfg)]
  assert sorted(_valid_indices(batches)) == list(range(5))

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class OvePipelineTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'labels': tfds.features.Tensor(shape=(3,), dtype=np.int32),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, png_record(i)

  OvePipelineTestImages(
    data_dir=str(tmp_path / 'tfds'), file_format='array_record'
  ).download_and_prepare()
  spec = f'tfds:ove_pipeline_test_images?split=train&data_dir={tmp_path / "tfds"}'
  src = sources.open_source(spec)
  assert len(src) == 4 and isinstance(src[0]['raw']['image'], bytes)
  cfg = pipeline.PipelineConfig(
    heads={'images': dataclasses.replace(head, source=spec)}, num_epochs=1, worker_count=0
  )
  batches = [step['images'] for step in pipeline.make_iterator(cfg)]
  assert sorted(_valid_indices(batches)) == list(range(4))


def test_decode_frames_refuses_text_files(tmp_path):
  from data_pipeline import video

  path = tmp_path / 'notes.txt'
  path.write_text('this is not a video\n' * 50)
  with pytest.raises(video.VideoError, match=r'notes\.txt: not a video \(FFmpeg reads it as text'):
    video.decode_frames(str(path), [0])
