"""Teachers from transformers (`ove-cluster-labels --teacher hf:...`) on built-in clips and stills.

Tiny randomly initialised CLIP vision models are saved locally (no download): one without an
image processor (CLIP mean / std at its image_size, `pooler_output`), one with a projection and
an image processor (`image_embeds`). The hub id is read from a populated local cache, offline.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from data_pipeline import builtin, precompute, records, tokens
from ove_jax import hf_teacher, labels
from ove_jax_tools import cluster_labels

TINY_CLIP = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=2,
  image_size=32,
  patch_size=8,
)


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory):
  """A random CLIPVisionModel, no image processor. Its final layer norm gets random weights and
  biases: with the initial ones every pooled output has norm sqrt(32), and the per-frame
  normalisation of a video would go untested."""
  torch.manual_seed(0)
  path = str(tmp_path_factory.mktemp('clip'))
  model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP))
  with torch.no_grad():
    for p in model.vision_model.post_layernorm.parameters():
      p.copy_(torch.randn_like(p) * 2)
  model.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def clip_proj_dir(tmp_path_factory):
  """A random CLIPVisionModelWithProjection (16-d embeddings) with its CLIP image processor."""
  torch.manual_seed(1)
  path = str(tmp_path_factory.mktemp('clip_proj'))
  config = transformers.CLIPVisionConfig(**TINY_CLIP, projection_dim=16)
  transformers.CLIPVisionModelWithProjection(config).save_pretrained(path)
  transformers.CLIPImageProcessor(
    size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}
  ).save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """(video shard, still shard): the built-in clips' codec records, and image records of the
  built-in stills (PNG bytes)."""
  root = str(tmp_path_factory.mktemp('builtin'))
  made = builtin.ensure(root, clips=4, images=4, budget=256, workers=0, progress=False)
  video = made['video_source']
  still = os.path.join(root, 'stills.array_record-00000-of-00001')
  writer = precompute.ShardWriter(still)
  for path in sorted(glob.glob(os.path.join(root, 'images', '*.png'))):
    with open(path, 'rb') as f:
      writer.write(
        records.encode({'image': f.read(), 'source': path, 'labels': np.asarray([-1], np.int32)})
      )
  writer.commit()
  return video, still


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def by_hand(model_dir, pictures_Fx224x224x3):
  """The pooled output of the saved CLIPVisionModel on pictures prepared by hand."""
  model = transformers.CLIPVisionModel.from_pretrained(model_dir).eval()
  x = np.stack([by_hand_pixels(p) for p in pictures_Fx224x224x3])
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(x)).pooler_output.numpy()


def by_hand_pixels(picture_HxWx3):
  """float32 [3, 32, 32]: bicubic resize to 32, CLIP mean / std."""
  x = np.asarray(Image.fromarray(picture_HxWx3).resize((32, 32), Image.Resampling.BICUBIC))
  x = (x.astype(np.float32) / 255.0 - np.asarray(tokens.CLIP_MEAN)) / np.asarray(tokens.CLIP_STD)
  return x.transpose(2, 0, 1).astype(np.float32)


def shard_features(out):
  return np.concatenate(
    [np.load(p) for p in sorted(glob.glob(str(out / 'features' / 'features-*.npy')))]
  )


def count_forwards(monkeypatch) -> list[int]:
  """The pictures of every teacher forward from now on, in a list filled as they run."""
  calls = []
  real_embed = hf_teacher.HFTeacher.embed

  def spy(self, pictures):
    calls.append(len(pictures))
    return real_embed(self, pictures)

  monkeypatch.setattr(hf_teacher.HFTeacher, 'embed', spy)
  return calls


def test_video_features_are_eight_frames_concatenated_and_resumed(
  clip_dir, corpus, tmp_path, monkeypatch
):
  video, _ = corpus
  out = tmp_path / 'out'
  args = [
    '--teacher',
    f'hf:{clip_dir}',
    '--records',
    video,
    '--k',
    '2',
    '--batch',
    '5',
    '--shard-records',
    '3',
    '--out',
    str(out),
  ]
  assert cluster_labels.main(args) == 0
  recs = precompute.read_shard(video)
  assert len(recs) == 4
  feats = shard_features(out)
  assert feats.shape == (4, 8 * 32)  # 8 frames x hidden size
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  for i, rec in enumerate(recs):
    pictures = hf_teacher.record_pixels(rec, i, seed=0)
    assert pictures.shape == (8, 224, 224, 3)
    # The pictures are the teacher frames of the ove_jax encoder, unpatchified.
    np.testing.assert_array_equal(
      tokens.patchify(pictures[None])[0].reshape(8, 256, -1), labels.record_frames(rec, i, 0)
    )
    want = unit(unit(by_hand(clip_dir, pictures)).reshape(-1))
    np.testing.assert_allclose(feats[i], want, atol=2e-5)
  lab = np.load(out / 'labels.npy')
  assert lab.shape == (4, 2) and lab.dtype == np.int32
  centres = np.load(out / 'centres.npy')
  assert centres.shape == (2, 256)
  np.testing.assert_array_equal(lab[:, 0], np.argmax(feats @ unit(centres).T, axis=1))
  assert list(np.load(out / 'ids.npy')) == [str(r['source']) for r in recs]
  report = json.loads((out / 'report.json').read_text())
  assert report['N'] == 4 and report['D'] == 256
  shards = sorted(glob.glob(str(out / 'features' / 'features-*.npy')))
  assert [os.path.basename(p) for p in shards] == ['features-00000.npy', 'features-00001.npy']

  # A re-run reads the shards: no forward pass, files untouched, same labels.
  mtimes = {p: os.stat(p).st_mtime_ns for p in shards}
  calls = count_forwards(monkeypatch)
  assert cluster_labels.main(args) == 0
  assert calls == []
  assert {p: os.stat(p).st_mtime_ns for p in shards} == mtimes
  np.testing.assert_array_equal(np.load(out / 'labels.npy'), lab)
  # A missing shard (an interrupted run) is the only one computed: record 3's 8 frames.
  os.remove(shards[1])
  assert cluster_labels.main(args) == 0
  assert calls == [5, 3]
  assert os.stat(shards[0]).st_mtime_ns == mtimes[shards[0]]
  np.testing.assert_allclose(shard_features(out), feats, atol=1e-6)
  # Shards of another teacher setting are refused, not mixed in.
  assert cluster_labels.main([*args[:-2], '--seed', '1', '--out', str(out)]) == 2


def test_stills_use_the_image_processor_and_projection(clip_proj_dir, corpus, tmp_path):
  _, still = corpus
  out = tmp_path / 'out'
  assert (
    cluster_labels.main(
      ['--teacher', f'hf:{clip_proj_dir}', '--records', still, '--k', '2', '--out', str(out)]
    )
    == 0
  )
  recs = precompute.read_shard(still)
  feats = shard_features(out)
  assert feats.shape == (len(recs), 16)  # projection_dim
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  model = transformers.CLIPVisionModelWithProjection.from_pretrained(clip_proj_dir).eval()
  processor = transformers.CLIPImageProcessor.from_pretrained(clip_proj_dir)
  pictures = np.concatenate([hf_teacher.record_pixels(r, i, 0) for i, r in enumerate(recs)])
  x = processor(images=list(pictures), return_tensors='pt')['pixel_values']
  with torch.no_grad():
    want = unit(model(pixel_values=x).image_embeds.numpy())
  np.testing.assert_allclose(feats, want, atol=2e-5)
  assert np.load(out / 'labels.npy').shape == (len(recs), 2)
  assert (out / 'report.json').is_file() and (out / 'centres.npy').is_file()


def test_two_tower_clip_gives_its_image_features(corpus, tmp_path):
  _, still = corpus
  torch.manual_seed(2)
  path = str(tmp_path / 'clip_full')
  config = transformers.CLIPConfig(
    text_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      vocab_size=99,
    ),
    vision_config=TINY_CLIP,
    projection_dim=8,
  )
  transformers.CLIPModel(config).save_pretrained(path)
  out = tmp_path / 'out'
  assert (
    cluster_labels.main(
      ['--teacher', f'hf:{path}', '--records', still, '--k', '2', '--out', str(out)]
    )
    == 0
  )
  recs = precompute.read_shard(still)
  pictures = np.concatenate([hf_teacher.record_pixels(r, i, 0) for i, r in enumerate(recs)])
  model = transformers.CLIPModel.from_pretrained(path).eval()
  x = hf_teacher.HFTeacher(path).pixel_values(pictures)  # CLIP mean / std at 32 (no processor)
  np.testing.assert_allclose(x, np.stack([by_hand_pixels(p) for p in pictures]), atol=1e-6)
  with torch.no_grad():
    want = unit(model.get_image_features(pixel_values=torch.from_numpy(x)).numpy())
  feats = shard_features(out)
  assert feats.shape == (len(recs), 8)
  np.testing.assert_allclose(feats, want, atol=2e-5)


def test_faiss_backend_labels_by_the_nearest_centre(clip_dir, corpus, tmp_path, capsys):
  video, _ = corpus
  out = tmp_path / 'out'
  assert (
    cluster_labels.main(
      [
        '--teacher',
        f'hf:{clip_dir}',
        '--records',
        video,
        '--k',
        '3',
        '--backend',
        'faiss',
        '--iters',
        '5',
        '--out',
        str(out),
      ]
    )
    == 0
  )
  report = json.loads(capsys.readouterr().out)
  assert report['backend'] == 'faiss' and report['k'] == 3 and report['iterations'] == 5
  feats = shard_features(out)
  centres = np.load(out / 'centres.npy')
  assert centres.shape == (3, 256)
  cos = feats @ unit(centres).T
  lab = np.load(out / 'labels.npy')
  np.testing.assert_array_equal(lab, np.argsort(-cos, axis=1, kind='stable'))
  np.testing.assert_allclose(
    report['inertia'], np.sum(2 - 2 * cos.max(axis=1)), rtol=1e-4, atol=1e-5
  )


def test_hub_id_from_the_offline_cache_and_bad_teachers(
  clip_dir, corpus, tmp_path, capsys, monkeypatch
):
  from huggingface_hub import constants

  video, _ = corpus
  cache = tmp_path / 'hub'
  repo = cache / 'models--ove-test--tiny-clip'
  commit = 'a' * 40  # the cache's layout: refs/main names the snapshot folder
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  shutil.copytree(clip_dir, repo / 'snapshots' / commit)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  out = tmp_path / 'out'
  base = ['--records', video, '--k', '2', '--out', str(out)]
  assert cluster_labels.main(['--teacher', 'hf:ove-test/tiny-clip', *base]) == 0
  ref = tmp_path / 'ref'
  assert cluster_labels.main(['--teacher', f'hf:{clip_dir}', *base[:-1], str(ref)]) == 0
  np.testing.assert_array_equal(shard_features(out), shard_features(ref))
  capsys.readouterr()

  assert cluster_labels.main(['--teacher', 'hf:ove-test/absent', *base]) == 2
  err = capsys.readouterr().err
  assert '--teacher hf:ove-test/absent' in err and 'HF_HUB_OFFLINE' in err
  missing = tmp_path / 'no_such_dir'
  assert cluster_labels.main(['--teacher', f'hf:{missing}', *base]) == 2
  assert f'--teacher hf:{missing}: ' in capsys.readouterr().err
  text = tmp_path / 'text_model'
  transformers.CLIPTextModel(
    transformers.CLIPTextConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      vocab_size=99,
    )
  ).save_pretrained(str(text))
  assert cluster_labels.main(['--teacher', f'hf:{text}', *base]) == 2
  assert 'is not a vision model' in capsys.readouterr().err
  mae = tmp_path / 'mae_model'  # takes pixels but pools nothing
  transformers.ViTMAEModel(
    transformers.ViTMAEConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
    )
  ).save_pretrained(str(mae))
  assert cluster_labels.main(['--teacher', f'hf:{mae}', *base[:-1], str(tmp_path / 'o2')]) == 2
  assert f'--teacher hf:{mae}: ViTMAEModel gives no pooled image embedding' in (
    capsys.readouterr().err
  )
  # A OneVision-Encoder export is ours to run: named before transformers' trust prompt.
  from ove_jax import checkpoint, convert

  export = convert.save_pytorch(checkpoint.load_encoder('random:tiny').model, str(tmp_path / 'ov'))
  assert cluster_labels.main(['--teacher', f'hf:{export}', *base]) == 2
  assert (
    f'which ove_jax runs itself: give it without hf: (--teacher {export})'
    in capsys.readouterr().err
  )
  # Damaged weights (model.safetensors of random bytes) are refused naming --teacher.
  damaged = tmp_path / 'damaged_clip'
  shutil.copytree(clip_dir, damaged)
  (damaged / 'model.safetensors').write_bytes(os.urandom(256))
  assert cluster_labels.main(['--teacher', f'hf:{damaged}', *base]) == 2
  assert f'--teacher hf:{damaged}: transformers cannot load it (SafetensorError' in (
    capsys.readouterr().err
  )


def test_damaged_or_short_feature_shards_are_computed_again(
  clip_dir, corpus, tmp_path, capsys, monkeypatch
):
  """A cached shard that is empty, truncated or short is named and computed again; the rest are
  read as they are, and the features equal those of the first run."""
  video, _ = corpus
  out = tmp_path / 'out'
  args = ['--teacher', f'hf:{clip_dir}', '--records', video, '--k', '2', '--out', str(out)]
  args += ['--batch', '8', '--shard-records', '1']  # a shard and a forward per clip
  assert cluster_labels.main(args) == 0
  feats = shard_features(out)
  folder = out / 'features'
  (folder / 'features-00000.npy').write_bytes(b'')  # emptied
  ids = (folder / 'ids-00001.npy').read_bytes()
  (folder / 'ids-00001.npy').write_bytes(ids[: len(ids) // 2])  # truncated
  np.save(folder / 'features-00002.npy', feats[2:3][:, :100])  # short rows: another width
  untouched = os.stat(folder / 'features-00003.npy').st_mtime_ns
  calls = count_forwards(monkeypatch)
  capsys.readouterr()
  assert cluster_labels.main(args) == 0
  err = capsys.readouterr().err
  assert calls == [8, 8, 8]  # shards 0, 1 and 2; shard 3 is read
  assert f'note: feature shard {folder / "features-00000.npy"}: empty (0 bytes)' in err
  assert f'note: feature shard {folder / "ids-00001.npy"}: truncated' in err
  assert f'note: {folder / "features-00002.npy"}: features of shape (1, 100)' in err
  assert os.stat(folder / 'features-00003.npy').st_mtime_ns == untouched
  np.testing.assert_allclose(shard_features(out), feats, atol=1e-6)
  # A shard of fewer rows than its ids is computed again too.
  np.save(folder / 'features-00001.npy', feats[:0])
  assert cluster_labels.main(args) == 0
  assert calls == [8, 8, 8, 8]
  assert 'features of shape (0, 256) and ids of shape (1,) for 1 records' in capsys.readouterr().err
