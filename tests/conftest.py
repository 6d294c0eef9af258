import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

# Many tests compile the same small programs: share compiled executables on disk.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("HVQ_TEST_JIT_CACHE", "/tmp/hvq_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from configs import tiny_cpu
from hvq_jax import model as model_lib


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
