"""ove_jax/sweeps.py and ove-sweep: expansion and names, printed commands, job array files, and a
real two-run sweep (one run fails in the trainer, the other trains 2 steps) that is re-run to
show finished runs are skipped and failures recorded."""

import csv
import json
import os
import shlex
import subprocess
import textwrap

import pytest

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
