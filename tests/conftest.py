import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

# Many tests compile the same small programs: share compiled executables on disk.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("HVQ_TEST_JIT_CACHE", "/tmp/hvq_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from hvq_jax.configs import tiny_cpu
from hvq_jax.nn import model as model_lib


def micro_config():
  """The tiny CPU config shrunk further so tests compile in seconds."""
  cfg = tiny_cpu.get_config()
  m = cfg.model
  m.ch, m.dec_ch, m.norm_groups = 16, 16, 4
  m.codebook_size = 64
  m.hyperprior.channels, m.hyperprior.latent_channels = 16, 4
  return cfg


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


@pytest.fixture(scope="session")
def micro_codec(micro_ckpt):
  from hvq_jax import codec
  return codec.load_model(micro_ckpt)
