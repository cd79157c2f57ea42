"""The trainer's input: the built-in data's sources, the host's input iterator, and the check
that every configured source can be read before a run starts.

`ove_jax.train` calls these; the pipeline itself is `data_pipeline.pipeline` (docs/pipeline.md).
A source that cannot be read is a `config.ConfigError` naming the key that gave it
(`data.heads.NAME.source` or `eval_sources.NAME`).
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import jax

from data_pipeline import paths
from ove_jax import config as config_lib


def check_paths(config, workdir: str) -> None:
  """Every path the run takes (--workdir and each string of the config: sources, builtin.root,
  init.*, data.local_cache_dir, ...) checked before anything is made or compiled: a ConfigError
  naming the key and the fix for a one-slash URL ('gs:/b', a local folder named 'gs:'), a URL
  as builtin.root (built-in data is made and read locally), a bucket that does not exist or
  cannot be listed, and a local cache folder (data.local_cache_dir, or the default one under
  XDG_CACHE_HOME when a URL is used) that is a file."""
  given = {'--workdir': workdir}
  given.update(
    (k, v) for k, v in config_lib.flatten(config).items() if isinstance(v, str) and v.strip()
  )
  for key, value in given.items():
    typo = paths.one_slash_url(value)
    if typo:
      raise config_lib.ConfigError(f'{key}={value}: {typo}')
  if paths.is_url(config.builtin.root or ''):
    raise config_lib.ConfigError(
      f"builtin.root={config.builtin.root} (an experiment's data_root=): built-in data is made "
      'and read on local disk; give a local folder, or leave it empty (a URL workdir keeps its '
      'built-in data in the local cache folder, docs/storage.md)'
    )
  why = config.data.local_cache_dir and paths.not_a_folder(config.data.local_cache_dir)
  if why:
    raise config_lib.ConfigError(
      f'data.local_cache_dir={config.data.local_cache_dir}: {why}; give a folder (objects of a '
      'bucket are staged there)'
    )
  checked = set()
  for key, value in given.items():
    for bucket in paths.buckets_in(value):
      problem = None if bucket in checked else paths.bucket_problem(bucket)
      checked.add(bucket)
      if problem:
        raise config_lib.ConfigError(f'{key}={value}: {problem}')
  problem = paths.default_cache_problem() if checked else None
  if problem:
    raise config_lib.ConfigError(problem)


def data_sources(config, workdir: str) -> dict[str, str]:
  """The built-in data's source strings (generated on first use) when builtin.enabled."""
  if not config.builtin.enabled:
    return {}
  from data_pipeline import builtin

  root = config.builtin.root or paths.local_folder(paths.join(workdir, 'builtin_data'))
  info = builtin.ensure(
    root,
    clips=config.builtin.clips,
    images=config.builtin.images,
    budget=config.builtin.budget,
    policy=config.builtin.policy,
    seed=config.seed,
    progress=jax.process_index() == 0,
  )
  return {'{builtin:video}': info['video_source'], '{builtin:image}': info['image_source']}


def _pipeline_data(config, sources, *, seed_offset=0, worker_count=None, evaluation=False):
  data = config_lib.pipeline_dict(
    config,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    sources=sources,
    source_overrides=dict(config.eval_sources) if evaluation else None,
  )
  data['seed'] = (data['seed'] + seed_offset) % 2**32
  if worker_count is not None:
    data['worker_count'] = worker_count
  return data


@contextlib.contextmanager
def _source_errors_as_config(config, evaluation: bool):
  """A pipeline.SourceError becomes a ConfigError naming the config key that gave the source."""
  from data_pipeline import pipeline

  try:
    yield
  except pipeline.SourceError as e:
    own = evaluation and e.head in config.eval_sources
    key = f'eval_sources.{e.head}' if own else f'data.heads.{e.head}.source'
    fix = e.fix or (
      'give a file, glob, folder of shards or tfds: name that holds records (docs/pipeline.md)'
    )
    raise config_lib.ConfigError(f'{key}={e.source!r}: {e.reason}; {fix}') from None


def make_iterator(
  config,
  sources: Mapping[str, str],
  *,
  seed_offset: int = 0,
  worker_count: int | None = None,
  evaluation: bool = False,
):
  from data_pipeline import pipeline

  data = _pipeline_data(
    config, sources, seed_offset=seed_offset, worker_count=worker_count, evaluation=evaluation
  )
  with _source_errors_as_config(config, evaluation):
    return pipeline.make_iterator(data)


def check_sources(config, sources: Mapping[str, str], *, evaluation: bool = False) -> None:
  """Opens the training (or, with `evaluation`, the evaluation) sources as make_iterator would,
  without starting a pipeline: a source that cannot be read is a ConfigError now."""
  from data_pipeline import pipeline

  with _source_errors_as_config(config, evaluation):
    pipeline.check_sources(_pipeline_data(config, sources, evaluation=evaluation))
