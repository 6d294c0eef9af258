import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

# Many tests compile the same small programs: share compiled executables on disk.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("HVQ_TEST_JIT_CACHE", "/tmp/hvq_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from hvq_jax.configs import micro as micro_lib
from hvq_jax.nn import model as model_lib

micro_config = micro_lib.get_config
TRAIN_STEPS = 3


def train_config(num_steps=TRAIN_STEPS):
  return micro_lib.train_config(num_steps)


@pytest.fixture(scope="session")
def trainer():
  """One Trainer for train_config(): its step compiles once for every file that trains."""
  from hvq_jax.training import train
  return train.Trainer(train_config())


@pytest.fixture(scope="session")
def straight(trainer, tmp_path_factory):
  """The uninterrupted run of train_config() (checkpoints at steps 0, 2 and 3): the
  reference every resumed run is compared with. (workdir, final state on the host)"""
  from hvq_jax.training import train
  wd = str(tmp_path_factory.mktemp("straight"))
  out = train.train_and_evaluate(train_config(), wd, progress=False, trainer=trainer)
  return wd, jax.device_get(out["state"])


def _restore(saved):
  if os.environ != saved:
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _restore_environment():
  """Tests that set environment variables (HVQ_LPIPS_DIR, XLA_FLAGS, ...) leave the next
  test the environment it had."""
  saved = dict(os.environ)
  yield
  _restore(saved)


@pytest.fixture(scope="module", autouse=True)
def _restore_module_environment():
  """The same for module fixtures that set variables (test_eval's HVQ_LPIPS_DIR): the
  next module starts with the environment the session had."""
  saved = dict(os.environ)
  yield
  _restore(saved)


@pytest.fixture(scope="session")
def micro():
  cfg = micro_config()
  model = model_lib.build(cfg.model)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  return cfg, model, params


def make_workdir(tmp_path_factory, name, seed):
  """An initial (step-0) checkpoint of the micro model, as `hvq train` writes it."""
  from hvq_jax.training import train
  c = micro_config()
  c.seed = seed
  c.train.num_steps = 0
  c.train.async_checkpoint = False
  c.eval.enabled = False
  d = str(tmp_path_factory.mktemp(name))
  train.train_and_evaluate(c, d, progress=False)
  return d


@pytest.fixture(scope="session")
def micro_ckpt(tmp_path_factory):
  return make_workdir(tmp_path_factory, "micro_ckpt", 0)


def hvq_cli(*args):
  """`python -m hvq_jax.cli ARGS` as a user runs it."""
  import subprocess
  import sys
  return subprocess.run([sys.executable, "-m", "hvq_jax.cli", *args], capture_output=True,
                        text=True)


@pytest.fixture(scope="session")
def exported(micro_ckpt, tmp_path_factory):
  """`hvq export --format torch` of the micro checkpoint (safetensors; no torch needed)."""
  path = str(tmp_path_factory.mktemp("export") / "model.safetensors")
  r = hvq_cli("export", "--checkpoint", micro_ckpt, "--format", "torch", "--out", path)
  assert r.returncode == 0, r.stderr
  return path


@pytest.fixture(scope="session")
def micro_codec(micro_ckpt):
  from hvq_jax import codec
  return codec.load_model(micro_ckpt)
