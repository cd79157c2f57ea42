"""pytest setup: 8 virtual CPU devices before JAX starts; absl flags parsed for grain workers."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_configure(config):
  del config
  from absl import flags
  flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def sharpen():
  """Scales every q/k projection so attention is far from uniform.

  At the from-scratch init (N(0, 0.02)) attention logits are ~0 and positions barely matter,
  which would let a wrong RoPE pass a parity test; trained weights are not like that.
  """
  def apply(model, factor=12.0, head=True):
    blocks = [model.blocks] if model.cfg.scan_layers else [*model.blocks]  # stacked: one module
    for module in blocks + ([model.head] if model.cfg.use_head and head else []):
      attn = getattr(module, 'self_attn', module)
      for proj in (attn.q_proj, attn.k_proj):
        proj.kernel[...] = proj.kernel[...] * factor
    return model
  return apply


@pytest.fixture(scope='session')
def builtin_root(tmp_path_factory):
  """One folder for the built-in data of the trainer runs in tests (made by the first run, reused
  by the others: every smoke config asks for the same data, see ove_jax.config.cpu_smoke)."""
  return str(tmp_path_factory.mktemp('builtin_data'))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def run_trainer():
  """`python -m ove_jax.train ARGS` in a subprocess from the repository root; returns the
  CompletedProcess (text output) and how long it took."""
  import subprocess
  import sys
  import time

  def run(*args, timeout=300):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'ove_jax.train', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start
  return run
