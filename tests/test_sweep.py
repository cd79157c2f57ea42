"""ove_jax/sweeps.py and ove-sweep: expansion and names, printed commands, job array files, and a
real two-run sweep (one run fails in the trainer, the other trains 2 steps) that is re-run to
show finished runs are skipped and failures recorded."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from data_pipeline import fileio, paths
from ove_jax import config as config_lib
from ove_jax import sweeps
from ove_jax_tools import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(REPO, 'experiments', 'ablations.py')


def _experiment(tmp_path, body: str, name: str = 'exp.py') -> str:
  """An experiment file built on ablations' smoke config, with the given sweep body."""
  path = tmp_path / name
  path.write_text(
    textwrap.dedent(f"""\
      from ove_jax import config as config_lib
      ablations = config_lib.load_module({ABLATIONS!r})

      def get_config(arg=None):
        c = ablations.get_config('smoke,steps=2,workers=0')
        c.builtin.clips, c.builtin.images = 2, 1
        c.log_every = 1
        return c

      """)
    + textwrap.dedent(body)
  )
  return str(path)


# ------------------------------------------------------------------------------------------------
# Expansion, names, validation
# ------------------------------------------------------------------------------------------------


def test_names_come_from_labels_or_short_keys_and_are_stable(tmp_path):
  spec = _experiment(
    tmp_path,
    """\
      def sweep(add, arg=None):
        add(**{'loss.margin': 0.1})
        add(**{'loss.sample_rate': 0.5, 'heads.video.sample_rate': 0.25})
        add(label={'selection': 'uniform'}, **{'data.heads.video.video_modes': (0, 1, 0, 0)})
        add(**{'data.heads.video.video_modes': (0.0, 0.0, 0.0, 1.0), 'model.rope': '1d'})
        add(**{'init.checkpoint': '/ckpt/a b'})
        add(**{'loss.scale': 1.0 + 1e-9, 'optim.lr': 0.001, 'data.heads.video.source': 'x' * 200})
        add()
      """,
  )
  points = sweeps.expand(spec)
  names = [p.name for p in points]
  assert names[:6] == [
    'margin=0.1',
    'loss.sample_rate=0.5,video.sample_rate=0.25',
    'selection=uniform',
    'video_modes=0.0-0.0-0.0-1.0,rope=1d',
    'checkpoint=_ckpt_a_b',
    names[5],
  ]
  assert names[6] == 'baseline'
  assert len(names[5]) == 120 and names[5].startswith('scale=1.000000001,lr=0.001,source=xxx')
  assert [p.name for p in sweeps.expand(spec)] == names  # the same sweep, the same names
  assert points[2].columns == {'selection': 'uniform'}
  assert points[2].override_args() == ['data.heads.video.video_modes=(0, 1, 0, 0)']
  assert dict(points[1].columns) == {'loss.sample_rate': 0.5, 'video.sample_rate': 0.25}
  # Every point's config is the experiment's with its overrides, as the trainer will make it.
  c = sweeps.point_config(spec, points[3])
  assert c.data.heads.video.video_modes == (0.0, 0.0, 0.0, 1.0) and c.model.rope == '1d'


@pytest.mark.parametrize(
  'body, message',
  [
    (
      "add(**{'loss.margin': 0.1})\n  add(**{'loss.margin': 0.1})",
      "two sweep points are both named 'margin=0.1'",
    ),
    (
      "add(**{'loss.margn': 0.1})",
      "sweep point margn=0.1: --config.loss.margn: loss has no key 'margn'",
    ),
    (
      "add(**{'init.pytorch': 7})",
      r"sweep point pytorch=7: init.pytorch=7 becomes '7' on the command line \(the key holds a "
      r'str\)',
    ),
    ("add(label='x', **{'loss.margin': 0.1})", 'give a non-empty dict of column name'),
    ("add(label={'status': 1}, **{'loss.margin': 0.1})", "label column.*'status'.*rename"),
    ('pass', 'added no points'),
  ],
)
def test_bad_sweeps_are_named(tmp_path, body, message):
  spec = _experiment(tmp_path, f'def sweep(add, arg=None):\n  {body}\n')
  with pytest.raises(config_lib.ConfigError, match=message):
    for point in sweeps.expand(spec):
      sweeps.point_config(spec, point)


def test_sweep_arg_and_errors_of_the_command_line(tmp_path, capsys):
  spec = _experiment(
    tmp_path,
    """\
      def sweep(add, arg=None):
        for rope in (arg or '3d,1d').split(';'):
          add(**{'model.rope': rope})
      """,
  )
  assert [p.name for p in sweeps.expand(spec + ':none;1d')] == ['rope=none', 'rope=1d']
  assert sweep.main([f'--config={spec}:none', '--root=/tmp/x', '--config.model.rope=3d']) == 2
  assert 'model.rope is swept by the experiment (point rope=none)' in capsys.readouterr().err
  no_sweep = tmp_path / 'plain.py'
  no_sweep.write_text('def get_config(arg=None):\n  return None\n')
  assert sweep.main([f'--config={no_sweep}', '--root=/tmp/x']) == 2
  assert 'has no sweep(add, arg=None) function' in capsys.readouterr().err
  assert sweep.main([f'--config={spec}', '--root=/tmp/x', '--run', '--print']) == 2
  assert sweep.main([f'--config={spec}', '--root=/tmp/x', '--only=rope=2d']) == 2
  assert "--only names ['rope=2d']" in capsys.readouterr().err
  # Runs whose checkpoints orbax cannot keep there are refused before any starts.
  assert sweep.main([f'--config={spec}', '--root=s3://bucket/sweep', '--run']) == 2
  assert 'error: --root s3://bucket/sweep: orbax-checkpoint' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Printing and job arrays
# ------------------------------------------------------------------------------------------------


def test_print_gives_one_trainer_command_per_point(tmp_path, capsys):
  spec = ABLATIONS + ':smoke,study=budget'
  root = str(tmp_path / 'sweep')
  assert (
    sweep.main([f'--config={spec}', f'--root={root}', '--print', '--config.total_steps=4']) == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4
  argv = shlex.split(lines[1])
  assert argv[:5] == [
    'python',
    '-m',
    'ove_jax.train',
    f'--config={spec}',
    f'--workdir={root}/budget=1024',
  ]
  assert argv[5:-1] == [
    '--config.data.heads.video.tokens_per_row=1024',
    '--config.data.heads.video.num_frames=4',
    '--config.builtin.budget=1024',
    '--config.builtin.policy=zero',
    '--config.total_steps=4',
  ]
  # Runs of the same built-in data share its folder; another budget is another folder.
  roots = [shlex.split(line)[-1] for line in lines]
  assert roots[1].startswith(f'--config.builtin.root={root}/builtin_data/budget1024_policy-zero')
  assert len(set(roots)) == 4
  selection = sweeps.expand(ABLATIONS + ':smoke,study=selection')
  configs = [sweeps.point_config(ABLATIONS + ':smoke,study=selection', p) for p in selection]
  assert len({sweeps.builtin_folder(c) for c in configs}) == 1
  assert not os.path.exists(root)  # printing writes nothing


def test_flags_take_a_value_after_a_space_or_an_equals_sign(tmp_path, capsys):
  spec = ABLATIONS + ':smoke,study=rope'
  root = str(tmp_path / 'sweep')
  assert sweep.main([f'--config={spec}', f'--root={root}', '--config.total_steps=4']) == 0
  with_equals = capsys.readouterr().out
  assert sweep.main(['--config', spec, '--root', root, '--config.total_steps', '4']) == 0
  assert capsys.readouterr().out == with_equals
  assert with_equals.count('--config.total_steps=4') == 3
  jobs = str(tmp_path / 'rope.jobs')
  assert sweep.main(['--config', spec, '--root', root, '--job-array', jobs]) == 0
  text = open(jobs).read()
  # Generated scripts call console scripts or modules, never a tool by a relative path.
  assert f'#   ove-sweep --config={spec} --root={root} --collect' in text
  assert 'tools/' not in text.replace(REPO, '')


def test_job_array_file_indexes_one_command_per_task(tmp_path, capsys):
  spec = ABLATIONS + ':smoke,study=rope'
  root, jobs = str(tmp_path / 'sweep'), str(tmp_path / 'rope.jobs')
  assert sweep.main([f'--config={spec}', f'--root={root}', '--print']) == 0
  printed = capsys.readouterr().out.splitlines()
  assert sweep.main([f'--config={spec}', f'--root={root}', f'--job-array={jobs}']) == 0
  text = open(jobs).read().splitlines()
  commands = [line for line in text if not line.startswith('#')]
  assert commands == printed and len(commands) == 3
  assert '#   #SBATCH --array=0-2' in text
  # The wrapper's own line picks task i's command (eval replaced by printf to see it).
  wrapper = next(line for line in text if 'SLURM_ARRAY_TASK_ID + 1' in line)
  shown = wrapper.replace('#   eval ', 'printf %s ', 1)
  for task in range(3):
    out = subprocess.run(
      ['bash', '-c', shown],
      env={**os.environ, 'SLURM_ARRAY_TASK_ID': str(task)},
      capture_output=True,
      text=True,
      check=True,
    ).stdout
    assert out == commands[task]
  saved = json.load(open(os.path.join(root, sweeps.SWEEP_JSON)))
  assert [p['name'] for p in saved['points']] == ['rope=3d', 'rope=1d', 'rope=none']


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


def _write_lines(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    for line in lines:
      f.write((json.dumps(line) if isinstance(line, dict) else line) + '\n')


def test_results_take_each_key_latest_value(tmp_path):
  spec = _experiment(
    tmp_path,
    """\
      def sweep(add, arg=None):
        add(**{'loss.margin': 0.1})
        add(**{'loss.margin': 0.2})
        add(**{'loss.margin': 0.3})
      """,
  )
  root = str(tmp_path / 'root')
  points = sweeps.expand(spec)
  configs = {p.name: sweeps.point_config(spec, p) for p in points}
  first = os.path.join(root, points[0].name)
  _write_lines(
    os.path.join(first, 'metrics.jsonl'),
    [
      {'step': 1, 'loss': 9.0, 'video/accuracy': 0.0, 'lr': 1.0},
      {'step': 2, 'loss': 8.0, 'video/accuracy': 0.5, 'eval/video/loss': 7.5},
      {'step': 1, 'loss': 9.5},  # a resumed run rewrote step 1: not the last
      {'step': 2, 'probe/video/knn_top1': 0.75},  # probes on a line of their own
      '{"step": 2, "loss": 1',  # a killed writer's half line
    ],
  )
  os.makedirs(os.path.join(first, 'checkpoints', '2'))
  open(os.path.join(first, 'checkpoints', '2', 'commit_success.txt'), 'w').close()
  _write_lines(
    os.path.join(root, points[1].name, 'metrics.jsonl'),
    [{'step': 1, 'loss': 'nan', 'video/accuracy': 0.25}],
  )
  columns, rows = sweeps.gather(root, points, configs, {points[2].name: 'failed (exit 2)'})
  assert columns == [
    'name',
    'margin',
    'status',
    'step',
    'loss',
    'video/accuracy',
    'eval/video/loss',
    'probe/video/knn_top1',
  ]
  assert rows[0] == {
    'name': 'margin=0.1',
    'margin': 0.1,
    'status': 'finished',
    'step': 2,
    'loss': 8.0,
    'video/accuracy': 0.5,
    'eval/video/loss': 7.5,
    'probe/video/knn_top1': 0.75,
  }
  assert rows[1]['status'] == 'unfinished' and rows[1]['loss'] != rows[1]['loss']  # nan
  assert rows[2]['status'] == 'failed (exit 2)' and rows[2]['step'] == ''
  csv_path, md_path = sweeps.write_results(root, columns, rows)
  table = open(md_path).read().splitlines()
  assert table[0] == (
    '| name | margin | status | step | loss | video/accuracy | '
    'eval/video/loss | probe/video/knn_top1 |'
  )
  assert table[2] == '| margin=0.1 | 0.1 | finished | 2 | 8 | 0.5 | 7.5 | 0.75 |'
  assert table[3].startswith('| margin=0.2 | 0.2 | unfinished | 1 | nan | 0.25 |')
  assert list(csv.DictReader(open(csv_path)))[0]['probe/video/knn_top1'] == '0.75'


# ------------------------------------------------------------------------------------------------
# A real sweep
# ------------------------------------------------------------------------------------------------


def test_run_records_a_failure_goes_on_and_skips_finished_runs(tmp_path, capsys):
  spec = _experiment(
    tmp_path,
    """\
      def sweep(add, arg=None):
        add(**{'mesh.fsdp': 3})        # 8 devices do not split by 3: the trainer refuses it
        add(**{'loss.margin': 0.2})
      """,
  )
  root = str(tmp_path / 'root')
  args = [f'--config={spec}', f'--root={root}', '--run']
  assert sweep.main(args) == 1
  out = capsys.readouterr()
  assert '[1/2] fsdp=3: failed (exit 2)' in out.out
  assert '[2/2] margin=0.2: finished in' in out.out
  assert '1 of 2 runs failed: fsdp=3' in out.err
  assert 'do not divide the 8 devices' in open(os.path.join(root, 'fsdp=3', 'train.log')).read()
  rows = list(csv.DictReader(open(os.path.join(root, sweeps.RESULTS_CSV))))
  assert [(r['name'], r['status'], r['step']) for r in rows] == [
    ('fsdp=3', 'failed (exit 2)', ''),
    ('margin=0.2', 'finished', '2'),
  ]
  loss = float(rows[1]['loss'])
  assert loss > 0 and 0 <= float(rows[1]['video/accuracy']) <= 1
  assert f'| margin=0.2 |  | 0.2 | finished | 2 | {loss:.4g} |' in out.out  # the table, printed

  log = os.path.join(root, 'margin=0.2', 'train.log')
  before = open(log).read()
  assert sweep.main(args) == 1  # the failing run fails again; the finished one is kept
  out = capsys.readouterr().out
  assert '[2/2] margin=0.2: finished already, skipped' in out
  assert open(log).read() == before
  rows = list(csv.DictReader(open(os.path.join(root, sweeps.RESULTS_CSV))))
  assert float(rows[1]['loss']) == loss
  assert sweep.main(args[:2] + ['--collect']) == 0
  saved = json.load(open(os.path.join(root, sweeps.SWEEP_JSON)))
  assert [p['status'] for p in saved['points']] == ['unfinished', 'finished']


# ------------------------------------------------------------------------------------------------
# Broken experiments, reruns into the same root, signals, job arrays in a bucket
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'body, message',
  [
    (
      "def sweep(add, arg=None):\n  raise RuntimeError('boom')\n",
      r'sweep\(\) raised RuntimeError: boom',
    ),
    ('def sweep():\n  pass\n', r'sweep is sweep\(\); define sweep\(add, arg=None\)'),
    ('def sweep(add, arg, extra):\n  pass\n', r'sweep is sweep\(add, arg, extra\)'),
    ('sweep = 3\n', r'sweep is sweep \(not a function\)'),
    ('def sweep(add, arg=None)\n  pass\n', r'cannot be loaded: SyntaxError: .*\(line 10\)'),
    ('import no_such_module_here\n', "cannot be loaded: ModuleNotFoundError: No module named 'no_"),
  ],
)
def test_a_broken_experiment_file_is_a_config_error_naming_it(tmp_path, capsys, body, message):
  spec = _experiment(tmp_path, body)
  assert sweep.main([f'--config={spec}', f'--root={tmp_path / "root"}', '--run']) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'config error: {spec}') and len(err.splitlines()) == 1
  assert re.search(message, err), err
  assert not os.path.exists(tmp_path / 'root')


def _saved_run(root, spec, point, common=(), edit=None):
  """A run folder as the trainer leaves it: its config.json (with `edit` applied to it)."""
  config = sweeps.point_config(spec, point, common)
  folder = sweeps.builtin_folder(config)
  config = config.to_dict()
  config['builtin']['root'] = sweeps.shared_builtin_root(root, folder)  # as its command gives it
  if edit:
    edit(config)
  run_dir = os.path.join(root, point.name)
  os.makedirs(run_dir, exist_ok=True)
  fileio.write_json(os.path.join(run_dir, 'config.json'), config, sort_keys=False, default=list)
  return run_dir


def test_runs_made_with_another_config_are_refused_naming_the_keys(tmp_path, capsys):
  spec = _experiment(
    tmp_path,
    """\
      def sweep(add, arg=None):
        add(**{'loss.scale': 16.0})
        add(**{'loss.scale': 32.0})
      """,
  )
  root = str(tmp_path / 'root')
  points = sweeps.expand(spec)
  first = _saved_run(root, spec, points[0])  # the first sweep ran with the experiment's values
  margin, lr = (sweeps.point_config(spec, points[0]).get(k) for k in ('loss', 'optim'))
  margin, lr = margin.margin, lr.lr
  args = [f'--config={spec}', f'--root={root}', '--config.loss.margin=0.5', '--config.optim.lr=0.5']
  for mode in ('--run', '--collect', f'--job-array={tmp_path / "jobs"}'):
    assert sweep.main([*args, mode]) == 2
    err = capsys.readouterr().err
    assert f'runs in {root} were made with another config' in err
    assert f'scale=16.0 (loss.margin {margin!r} -> 0.5, optim.lr {lr!r} -> 0.5)' in err
    assert 'scale=32.0' not in err  # not run yet: nothing to compare
    assert "give a new --root, or remove those runs' folders" in err
  assert not os.path.exists(os.path.join(first, sweeps.TRAIN_LOG))  # nothing ran
  assert not os.path.exists(os.path.join(root, sweeps.SWEEP_JSON))
  # The same flags as the first sweep, and keys a resume may change, are accepted.
  resumable = ['--config.total_steps=5', '--config.log_every=3', '--config.mesh.data=8']
  assert sweep.main([f'--config={spec}', f'--root={root}', '--collect', *resumable]) == 0
  capsys.readouterr()

  # The shared built-in data counts by its folder's name, not by where it was (a URL root's local
  # folder depends on the cache folder); other data is another config.
  def elsewhere(config):
    config['builtin']['root'] = '/elsewhere/builtin_data/' + os.path.basename(
      config['builtin']['root']
    )

  _saved_run(root, spec, points[0], edit=elsewhere)
  assert sweep.main([f'--config={spec}', f'--root={root}', '--collect']) == 0
  _saved_run(root, spec, points[0], edit=lambda c: c['builtin'].update(root='/data/other'))
  assert sweep.main([f'--config={spec}', f'--root={root}', '--collect']) == 2
  assert "(builtin.root '/data/other' -> " in capsys.readouterr().err

  # A key the saved config lacks (added to the code since) counts only when set to another value.
  def drop(config):
    del config['loss']['margin'], config['seed']

  _saved_run(root, spec, points[0], edit=drop)
  assert sweep.main([f'--config={spec}', f'--root={root}', '--collect']) == 0
  assert sweep.main([*args[:3], '--collect']) == 2
  assert "(loss.margin '(unset)' -> 0.5)" in capsys.readouterr().err


def test_a_checkpoint_beyond_total_steps_is_reported_without_running(tmp_path, capsys):
  spec = _experiment(tmp_path, "def sweep(add, arg=None):\n  add(**{'loss.margin': 0.2})\n")
  root = str(tmp_path / 'root')
  point = sweeps.expand(spec)[0]
  run_dir = _saved_run(root, spec, point, edit=lambda c: c.update(total_steps=60))
  for step in (2, 60):  # a run of total_steps=60 keeps step 2 too (keep_every)
    os.makedirs(os.path.join(run_dir, 'checkpoints', str(step)))
    open(os.path.join(run_dir, 'checkpoints', str(step), 'commit_success.txt'), 'w').close()
  why = 'failed (its checkpoint of step 60 is beyond total_steps 2; give --config.total_steps=60'
  assert sweep.main([f'--config={spec}', f'--root={root}', '--run']) == 1
  out = capsys.readouterr()
  assert f'[1/1] margin=0.2: {why}' in out.out and '1 of 1 runs failed' in out.err
  assert not os.path.exists(os.path.join(run_dir, sweeps.TRAIN_LOG))  # the trainer never started
  assert sweep.main([f'--config={spec}', f'--root={root}', '--collect']) == 0
  rows = list(csv.DictReader(open(os.path.join(root, sweeps.RESULTS_CSV))))
  assert rows[0]['status'].startswith(why)


# A trainer stand-in: a process group of two (it and a child of its own), each saving on SIGTERM.
FAKE_TRAINER = """\
import os, signal, subprocess, sys, time
workdir, child = sys.argv[1], None
def save(name):
  def handle(signum, frame):
    open(os.path.join(workdir, name), 'w').write(signal.Signals(signum).name)
    if child is not None:  # a trainer waits for its workers
      child.wait()
    sys.exit(75)
  return handle
if len(sys.argv) > 2:
  signal.signal(signal.SIGTERM, save('child_saved'))
  open(os.path.join(workdir, 'child_started'), 'w').close()
  time.sleep(60)
signal.signal(signal.SIGTERM, save('saved'))
child = subprocess.Popen([sys.executable, __file__, workdir, 'x'])
open(os.path.join(workdir, 'started'), 'w').close()
time.sleep(60)
"""


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_a_signal_to_the_sweep_stops_its_trainer_which_saves(
  tmp_path, capsys, monkeypatch, signum, code
):
  spec = _experiment(
    tmp_path,
    """\
      def sweep(add, arg=None):
        add(**{'loss.margin': 0.1})
        add(**{'loss.margin': 0.2})
      """,
  )
  root, trainer = str(tmp_path / 'root'), tmp_path / 'trainer.py'
  trainer.write_text(FAKE_TRAINER)
  monkeypatch.setattr(
    sweeps,
    'train_command',
    lambda spec, root, p, *a: [sys.executable, str(trainer), os.path.join(root, p.name)],
  )
  first = os.path.join(root, 'margin=0.1')

  def send():
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(first, 'child_started')):
      assert time.monotonic() < deadline
      time.sleep(0.05)
    os.kill(os.getpid(), signum)

  sender = threading.Thread(target=send)
  sender.start()
  assert sweep.main([f'--config={spec}', f'--root={root}', '--run']) == code
  sender.join()
  out = capsys.readouterr()
  # The trainer and its child got SIGTERM (the trainer saves on it), and the sweep waited.
  assert open(os.path.join(first, 'saved')).read() == 'SIGTERM'
  assert open(os.path.join(first, 'child_saved')).read() == 'SIGTERM'
  assert f'[1/2] margin=0.1: stopped ({signal.Signals(signum).name}), exit 75' in out.out
  assert f'interrupted ({signal.Signals(signum).name}): writing the results so far' in out.err
  assert not os.path.exists(os.path.join(root, 'margin=0.2'))  # the next point never started
  assert os.path.exists(os.path.join(root, sweeps.RESULTS_MD))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the sweep's handlers are gone


def test_collect_into_a_file_is_refused(tmp_path, capsys):
  afile = tmp_path / 'afile'
  afile.write_text('')
  spec = ABLATIONS + ':smoke,study=rope'
  assert sweep.main([f'--config={spec}', f'--root={afile}', '--collect']) == 2
  assert f'error: --root {afile}: a file, not a folder' in capsys.readouterr().err


def test_a_job_array_file_in_a_bucket_is_written_there(gcs, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  spec = ABLATIONS + ':smoke,study=rope'
  root, jobs = paths.join(gcs, 'sweep'), paths.join(gcs, 'sweep', 'jobs.txt')
  assert sweep.main([f'--config={spec}', f'--root={root}', f'--job-array={jobs}']) == 0
  assert capsys.readouterr().out == f'wrote 3 commands to {jobs}\n'
  assert not os.path.exists(tmp_path / 'gs:')
  text = paths.read_bytes(jobs).decode().splitlines()
  commands = [line for line in text if not line.startswith('#')]
  assert len(commands) == 3 and all(f'--workdir={root}/rope=' in c for c in commands)
  # The wrapper's own line reads the object (eval replaced by printf to see it).
  wrapper = next(line for line in text if 'SLURM_ARRAY_TASK_ID + 1' in line)
  env = {
    **os.environ,
    'SLURM_ARRAY_TASK_ID': '1',
    'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'],
  }
  shown = wrapper.replace('#   eval ', 'printf %s ', 1)
  out = subprocess.run(['bash', '-c', shown], env=env, capture_output=True, text=True, check=True)
  assert out.stdout == commands[1]
