"""The plug-in prior: a hyperprior trained on a frozen tokenizer, rate loss only."""
import numpy as np
import jax
import pytest

from hvq_jax import codec, images
from hvq_jax.nn import model as model_lib
from hvq_jax.training import train
from hvq_jax.training import optim
from hvq_jax.training import trainer as trainer_lib
from tests.conftest import micro_config


def _cfg(hyper_on: bool, steps: int):
  c = micro_config()
  c.model.hyperprior.enabled = hyper_on
  c.train.num_steps = steps
  c.train.async_checkpoint = False
  c.train.batch_size = 2
  c.image_size = 32
  c.eval.enabled = False
  return c


@pytest.mark.slow   # two training runs; the fast suite keeps the frozen-tokenizer check in
#                     test_phases (prior phase) and the optimiser test below
def test_plug_in_prior_freezes_the_tokenizer_and_trains_the_prior(tmp_path):
  off = str(tmp_path / "off")
  train.train_and_evaluate(_cfg(False, 0), off, progress=False)   # any tokenizer: its init
  c = _cfg(True, 2)
  c.train.init_from, c.train.trainable = off, "prior"
  plug = str(tmp_path / "plug")
  train.train_and_evaluate(c, plug, progress=False)
  _, src = codec.load_params(off)
  _, got = codec.load_params(plug)
  flat_src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(src)[0]}
  ck0 = train.ckpt_lib.Checkpointer(str(tmp_path / "plug" / "checkpoints"), async_save=False)
  assert ck0.all_steps() == [0, 2]
  ck0.close()
  moved = 0
  for p, v in jax.tree_util.tree_flatten_with_path(got)[0]:
    k = jax.tree_util.keystr(p)
    if optim.is_prior(p):
      assert k not in flat_src                      # the off run had static_*, not hyper_*
    else:
      np.testing.assert_array_equal(v, flat_src[k], err_msg=k)   # frozen, bit for bit
  step0 = codec.load_params(plug, step=0)[1]       # the plug-in run's initial prior
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(step0)):
    if optim.is_prior(p):
      moved += int(not np.array_equal(a, b))
  assert moved > 10                                 # the prior did train
  # same tokenizer: identical indices and reconstructions, only the bits differ
  img = images.bundled_photo("coffee")[:64, :96]
  m_off, m_plug = codec.load_model(off), codec.load_model(plug)
  _, i_off, g_off = codec.decode_indices(m_off, codec.compress(m_off, img))
  d_plug = codec.compress(m_plug, img)
  _, i_plug, g_plug = codec.decode_indices(m_plug, d_plug)
  np.testing.assert_array_equal(g_off, g_plug)
  for k in i_off:
    np.testing.assert_array_equal(i_off[k], i_plug[k])
  np.testing.assert_array_equal(codec.decompress(m_off, codec.compress(m_off, img)),
                                codec.decompress(m_plug, d_plug))


def test_plug_in_needs_a_source():
  c = _cfg(True, 1)
  c.train.trainable = "prior"
  with pytest.raises(model_lib.ConfigError, match="init_from"):
    trainer_lib.validate_config(c)
  c.train.trainable = "encoder"
  with pytest.raises(model_lib.ConfigError, match="trainable"):
    trainer_lib.validate_config(c)


def test_plug_in_optimiser_keeps_no_moments_for_the_frozen_tokenizer():
  c = _cfg(True, 1)
  c.train.init_from, c.train.trainable = "unused", "prior"
  t = train.Trainer(c)
  params = t.abstract_state["params"]
  prior = [p for p, a in jax.tree_util.tree_flatten_with_path(params)[0]
           if optim.is_prior(p) and a.ndim > 0]
  n_params = len([a for a in jax.tree.leaves(params) if a.ndim > 0])
  assert 0 < len(prior) < n_params
  # Adam's two moments exist for the prior's leaves only (set_to_zero keeps no state)
  opt_leaves = [a for a in jax.tree.leaves(t.abstract_state["opt_g"]) if a.ndim > 0]
  assert len(opt_leaves) == 2 * len(prior)
  full = train.Trainer(_cfg(True, 1))
  assert len([a for a in jax.tree.leaves(full.abstract_state["opt_g"]) if a.ndim > 0]) == 2 * n_params
