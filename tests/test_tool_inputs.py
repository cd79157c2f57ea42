"""Bad input to the batch tools (ove-precompute-codec, ove-llava-data, ove-visualize-selection):
each is refused before any work, with a message that names the file or flag and the fix, and
settings that would mix two runs' files are refused too."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from data_pipeline import llava, llava_import, records, shards, sources, synthetic
from ove_jax import cli
from ove_jax_tools import llava_data, precompute_codec, visualize_selection


@pytest.fixture(scope='module')
def video(tmp_path_factory):
  folder = tmp_path_factory.mktemp('video')
  return synthetic.make_clip(1, num_frames=8, height=64, width=64).write(folder / 'a.mp4')


def refused(main, argv, capsys) -> str:
  """main(argv) refuses (exit status 2, from main or from argparse); its stderr."""
  try:
    status = main(argv)
  except SystemExit as e:
    status = e.code
  assert status == 2, status
  return capsys.readouterr().err


def test_flag_types_name_the_value_and_the_fix(tmp_path):
  assert cli.count('3') == 3 and cli.seconds('0') == 0.0 and cli.seconds('2.5') == 2.5
  for text in ('-1', 'two', '1.5'):
    with pytest.raises(Exception, match=r'>= 0 \(0: in this process\)'):
      cli.count(text)
  for text in ('-5', 'nan', 'inf', 'soon'):
    with pytest.raises(Exception, match=r'seconds >= 0 \(0: no limit\)'):
      cli.seconds(text)
  options = tmp_path / 'options.json'
  options.write_text('{"budget": 64}')
  assert cli.json_object(str(options)) == cli.json_object('{"budget": 64}') == {'budget': 64}
  with pytest.raises(Exception, match='missing.json: no such file'):
    cli.json_object(str(tmp_path / 'missing.json'))
  with pytest.raises(Exception, match='a folder, not a JSON file'):
    cli.json_object(str(tmp_path))
  with pytest.raises(Exception, match='is not JSON'):
    cli.json_object('{budget: 64}')
  with pytest.raises(Exception, match='give a JSON object'):
    cli.json_object('[64]')


def test_precompute_refuses_bad_flags_and_empty_inputs(tmp_path, video, capsys):
  listing = tmp_path / 'videos.txt'
  listing.write_text(f'{video}\n')
  out = str(tmp_path / 'out')
  err = refused(precompute_codec.main, [str(listing), out, '--workers', '-1'], capsys)
  assert "--workers: '-1': a whole number >= 0" in err
  err = refused(precompute_codec.main, [str(listing), out, '--clip-timeout', '-5'], capsys)
  assert "--clip-timeout: '-5': seconds >= 0 (0: no limit)" in err
  err = refused(
    precompute_codec.main, [str(listing), out, '--options', str(tmp_path / 'o.json')], capsys
  )
  assert 'o.json: no such file' in err
  empty = tmp_path / 'empty.txt'
  empty.write_text('# nothing yet\n\n')
  err = refused(precompute_codec.main, [str(empty), out, '--no-progress'], capsys)
  assert f'{empty}: no input clips in this list' in err
  (tmp_path / 'no_videos').mkdir()
  (tmp_path / 'no_videos' / 'notes.txt').write_text('not a video')
  err = refused(precompute_codec.main, [str(tmp_path / 'no_videos'), out], capsys)
  assert 'no input clips in this folder (files ending in .mp4, .m4v' in err
  err = refused(precompute_codec.main, [str(listing), out, '--num-tasks', '0'], capsys)
  assert 'num_tasks=0: need num_tasks >= 1' in err
  for flag, value, words in (
    ('--max-shards', '0', "'0': a whole number >= 1"),
    ('--inline-max-bytes', '-1', "'-1': a whole number >= 0"),
  ):
    assert words in refused(precompute_codec.main, [str(listing), out, flag, value], capsys)
  assert not os.path.exists(out)
  # A time limit that cannot apply (clips in the command's own process) is said, not ignored.
  flags = ['--num-frames', '4', '--budget', '8', '--resolution', '56', '--no-progress']
  argv = [str(listing), out, *flags, '--workers', '0']
  assert precompute_codec.main([*argv, '--clip-timeout', '5']) == 0
  assert '--clip-timeout 5 does not apply with --workers 0' in capsys.readouterr().err
  assert precompute_codec.main(argv) == 0  # the default limit: nothing to say
  assert 'does not apply' not in capsys.readouterr().err


def test_a_task_that_owns_no_shard_says_so(tmp_path, video, capsys):
  listing = tmp_path / 'videos.txt'
  listing.write_text(f'{video}\n')
  flags = ['--num-frames', '4', '--budget', '8', '--resolution', '56', '--no-progress']
  argv = [str(listing), str(tmp_path / 'out'), *flags, '--num-tasks', '2']
  assert precompute_codec.main([*argv, '--task-index', '1']) == 0
  assert 'task 1 of 2 owns no shard (the plan has 1;' in capsys.readouterr().err
  assert precompute_codec.main([*argv, '--task-index', '0']) == 0
  assert 'owns no shard' not in capsys.readouterr().err


def test_tfds_name_without_data_dir_points_at_data_dir():
  with pytest.raises(FileNotFoundError, match=r"give its folder: 'tfds:ove_codec\?data_dir="):
    sources.open_source('tfds:ove_codec')


def test_llava_tool_refuses_a_missing_list_and_a_bad_grid(tmp_path, capsys):
  roots = ['--visidx-root', str(tmp_path / 'v'), '--image-root', str(tmp_path / 'i')]
  missing = str(tmp_path / 'nodata.jsonl')
  err = refused(llava_data.main, ['make', missing, *roots, '--out-jsonl', 'x.jsonl'], capsys)
  assert f'{missing}: no such dataset file' in err
  err = refused(
    llava_data.main, ['make', missing, *roots, '--out-jsonl', 'x', '--workers', '-2'], capsys
  )
  assert "--workers: '-2'" in err
  err = refused(
    llava_data.main, ['import', str(tmp_path), 'x.array_record', '--model-grid', '0'], capsys
  )
  assert 'model_grid=0: patches a side of the model grid, >= 1 (16 for our 224 / 14 model)' in err


def test_llava_budget_must_fill_the_canvases_when_the_first_is_a_whole_frame(tmp_path, video):
  dataset = tmp_path / 'data.txt'
  dataset.write_text(f'{video}\n')
  args = dict(visidx_root=str(tmp_path / 'v'), image_root=str(tmp_path / 'i'), workers=0)
  small = llava.Settings(num_frames=4, resolution=64, budget=24, num_images=2)
  with pytest.raises(ValueError, match=r'budget must be num_images x 16 = 32 .*--no-first-full'):
    llava.run(str(dataset), out_jsonl=str(tmp_path / 'a.jsonl'), settings=small, **args)
  assert not os.path.exists(args['visidx_root'])
  packed = llava.Settings(num_frames=4, resolution=64, budget=24, num_images=2, first_full=False)
  out = str(tmp_path / 'b.jsonl')
  assert llava.run(str(dataset), out_jsonl=out, settings=packed, **args)['made'] == 1
  (line,) = [json.loads(text) for text in open(out)]
  assert np.load(line['positions_thw']).shape == (24, 3)  # every selected patch is on a canvas


def stage1_files(folder, name='clip', grid=36):
  """One clip's stage1 files as the release writes them."""
  os.makedirs(folder, exist_ok=True)
  prefix = os.path.join(folder, name)
  np.save(prefix + '.visidx_thw.npy', np.array([[0, 0, 0], [1, grid - 1, grid - 1]], np.int32))
  np.save(prefix + '.frame_ids.npy', np.array([0, 3], np.int32))
  with open(prefix + '.meta.json', 'w') as f:
    json.dump({'video': os.path.join(folder, 'a.mp4'), 'hb': grid}, f)
  return prefix


def test_import_makes_its_folder_and_names_missing_frame_ids(tmp_path, capsys):
  prefix = stage1_files(str(tmp_path / 'v'))
  out = str(tmp_path / 'new' / 'sub' / 'x.array_record')
  assert llava_data.main(['import', str(tmp_path / 'v'), out]) == 0
  capsys.readouterr()
  (record,) = shards.read_shard(out)
  assert record['positions'].tolist() == [[0, 0, 0], [1, 35, 35]]
  os.remove(prefix + '.frame_ids.npy')
  with pytest.raises(ValueError, match='frame_ids.npy are missing .stage1 writes them beside'):
    llava_import.release_record(prefix + '.visidx_thw.npy')
  prefix = stage1_files(str(tmp_path / 'w'))
  os.remove(prefix + '.meta.json')
  with pytest.raises(ValueError, match=r'no .*clip.meta.json gives the grid .* copy it there'):
    llava_import.release_record(prefix + '.visidx_thw.npy', source='a.mp4')


def test_visualiser_tells_videos_from_shards(tmp_path, video, capsys):
  out = str(tmp_path / 'pictures')
  err = refused(visualize_selection.main, [video, '--index', '0', '--out', out], capsys)
  assert 'no record 0 could be read' in err and 'for a video, leave it out' in err
  shard = str(tmp_path / 'clips.array_record')
  writer = shards.ShardWriter(shard)
  writer.write(
    records.encode(
      {
        'source': video,
        'frame_ids': np.arange(2, dtype=np.int32),
        'positions': np.array([[0, 0, 0], [1, 35, 35]], np.int16),
        'picture_types': np.zeros(2, np.uint8),
        'geometry': 'letterbox',
      }
    )
  )
  writer.commit()
  err = refused(visualize_selection.main, [shard, '--out', out], capsys)
  assert 'is a shard of records; give --index I' in err
  err = refused(visualize_selection.main, [shard, '--index', '0', '--out', out], capsys)
  assert 'positions up to 35, beyond the 16 x 16 grid of 224 / 14' in err
  assert '--resolution and --patch-size' in err
  assert not os.path.exists(out)
  argv = [shard, '--index', '0', '--out', out, '--resolution', '576', '--patch-size', '16']
  assert visualize_selection.main(argv) == 0
  assert os.path.exists(os.path.join(out, 'selection.png'))


def test_llava_run_refuses_other_settings_on_the_same_jsonl(tmp_path, video):
  dataset = tmp_path / 'data.txt'
  dataset.write_text(f'{video}\n')
  settings = llava.Settings(num_frames=4, resolution=64, budget=32, num_images=2)
  args = dict(
    visidx_root=str(tmp_path / 'v'),
    image_root=str(tmp_path / 'i'),
    out_jsonl=str(tmp_path / 'train.jsonl'),
    workers=0,
  )
  assert llava.run(str(dataset), settings=settings, **args)['made'] == 1
  # The same settings again (other pool flags): nothing to make.
  assert llava.run(str(dataset), settings=settings, **dict(args, workers=1))['skipped'] == 1
  png = llava.Settings(num_frames=4, resolution=64, budget=32, num_images=2, image_format='png')
  with pytest.raises(ValueError, match="image_format: 'jpg' then, 'png' now.*own --out-jsonl"):
    llava.run(str(dataset), settings=png, **args)
  with pytest.raises(ValueError, match='options:'):
    llava.run(str(dataset), settings=settings, camera_compensation='none', **args)
  (pack,) = [n for n in os.listdir(args['image_root']) if n != llava.SETTINGS_FILE]
  images = sorted(os.listdir(os.path.join(args['image_root'], pack)))
  assert [name.rsplit('.', 1)[1] for name in images if '_0' in name] == ['jpg', 'jpg']


def test_read_arrays_names_the_file_and_what_is_wrong(tmp_path):
  from data_pipeline import fileio

  good = tmp_path / 'good.npz'
  np.savez(good, features=np.ones((3, 2), np.float32), ids=np.array(['a', 'b', 'c']))
  arrays = fileio.read_arrays(str(good), '--features')
  assert sorted(arrays) == ['features', 'ids'] and arrays['features'].shape == (3, 2)
  np.save(tmp_path / 'one.npy', np.arange(4))
  assert fileio.read_arrays(str(tmp_path / 'one.npy')).tolist() == [0, 1, 2, 3]

  (tmp_path / 'empty.npy').write_bytes(b'')
  (tmp_path / 'trunc.npz').write_bytes(good.read_bytes()[:100])
  (tmp_path / 'garbage.npy').write_bytes(b'not numpy at all' * 10)
  np.save(tmp_path / 'objects.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
  np.save(tmp_path / 'short.npy', np.arange(1000))
  (tmp_path / 'short.npy').write_bytes((tmp_path / 'short.npy').read_bytes()[:300])
  for name, message in [
    ('missing.npy', 'no such file'),
    ('empty.npy', 'empty (0 bytes)'),
    ('trunc.npz', 'truncated or not a .npy / .npz file'),
    ('garbage.npy', 'truncated or not a .npy / .npz file'),
    ('objects.npy', 'holds Python objects'),
    ('short.npy', 'truncated or not a .npy / .npz file'),
    ('', 'a directory'),
  ]:
    path = str(tmp_path / name)
    with pytest.raises(fileio.ArrayFileError, match=re.escape(f'--init {path}: {message}')):
      fileio.read_arrays(path, '--init')


def test_every_tool_refuses_a_one_slash_url(tmp_path, video, capsys):
  """'gs:/bucket' (one slash) would be a local folder named 'gs:' to every path function: each
  tool's parser refuses it in any flag, positional or passed-on --config.KEY, naming both."""
  from ove_jax_tools import convert_checkpoint, probe, sweep

  listing = tmp_path / 'videos.txt'
  listing.write_text(f'{video}\n')
  for main, argv, flag in [
    (precompute_codec.main, [str(listing), 'gs:/bucket/out'], 'out_dir gs:/bucket/out'),
    (
      llava_data.main,
      ['make', str(listing), '--visidx-root=v', '--image-root=S3:/b/i', '--out-jsonl=o.jsonl'],
      '--image-root S3:/b/i',
    ),
    (sweep.main, ['--config', 'x.py', '--root', '/r', '--job-array=gs:/b/jobs'], '--job-array'),
    (sweep.main, ['--config', 'x.py', '--root', '/r', '--config.init.encoder=gs:/b/w'], 'argument'),
    (
      convert_checkpoint.main,
      ['from-train', '--workdir', 'gs:/b/run', '--out', str(tmp_path / 'o')],
      '--workdir',
    ),
    (
      probe.main,
      ['--checkpoint', 'random:tiny', '--records', 'r', '--out', 'gs:/b/p.json'],
      '--out gs:/b/p.json',
    ),
  ]:
    err = refused(main, argv, capsys)
    assert flag in err and 'a URL with one slash' in err and '://' in err, (argv, err)
    assert not os.path.exists('gs:') and not os.path.exists('S3:')
  # A URL naming no bucket ('gs://', 'gs:///run') would become a local 'gs:' folder as well.
  for main, argv, flag in [
    (precompute_codec.main, [str(listing), 's3://'], 'out_dir s3://'),
    (sweep.main, ['--config', 'x.py', '--root', 'gs:///b/sweep'], '--root gs:///b/sweep'),
    (probe.main, ['--checkpoint', 'random:tiny', '--records', 'gs://', '--out', 'p.json'], 'gs://'),
  ]:
    err = refused(main, argv, capsys)
    assert flag in err and 'names no bucket; write ' in err, (argv, err)
    assert not os.path.exists('gs:') and not os.path.exists('s3:')
  # Two slashes, and a colon elsewhere in a value, pass the parser.
  args = precompute_codec.build_parser().parse_args([str(listing), 'gs://bucket/out'])
  assert args.out_dir == 'gs://bucket/out'
  assert cli.one_slash_problem(precompute_codec.build_parser(), args, ['key=a:/b']) == ''
