"""Training program: exact resume, atomic checkpoints, NaN guard, RD behaviour."""
import json
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax.training import train
from tests.conftest import micro_config


def _train_config(steps):
  c = micro_config()
  c.train.batch_size, c.train.num_steps = 2, steps
  c.train.log_every, c.train.ckpt_every = 1, 1000
  c.train.async_checkpoint = False
  c.eval.enabled = False
  return c


def _params(out):
  return jax.tree.leaves(jax.device_get(out["state"]))


def test_resume_is_bitwise_exact(tmp_path):
  straight = train.train_and_evaluate(_train_config(4), str(tmp_path / "a"), progress=False)
  train.train_and_evaluate(_train_config(2), str(tmp_path / "b"), progress=False)
  resumed = train.train_and_evaluate(_train_config(4), str(tmp_path / "b"), progress=False)
  for x, y in zip(_params(straight), _params(resumed)):
    np.testing.assert_array_equal(x, y)
  lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  assert all({"loss", "bpp", "psnr", "bpp_z", "bpp_map"} <= set(l) for l in lines)


def test_zero_steps_writes_initial_checkpoint(tmp_path):
  train.train_and_evaluate(_train_config(0), str(tmp_path), progress=False)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert ck.latest_step() == 0
  assert ck.restore_config()["model"]["codebook_size"] == micro_config().model.codebook_size


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
  d = str(tmp_path / "ck")
  ck = ckpt_lib.Checkpointer(d, async_save=False)
  state = {"w": jnp.arange(4.0), "step": jnp.array(1)}
  ck.save(1, state, force=True)
  ck.close()
  # A save killed mid-way leaves only Orbax's temporary directory behind.
  partial = os.path.join(d, "2.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "junk"), "wb") as f:
    f.write(b"\0" * 10)
  ck = ckpt_lib.Checkpointer(d, async_save=False)
  assert ck.latest_step() == 1
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  got = ck.restore(None, abstract)
  np.testing.assert_array_equal(got["w"], np.arange(4.0))


def test_nonfinite_step_is_skipped():
  c = _train_config(1)
  trainer = train.Trainer(c)
  state = trainer.init_state(jax.random.PRNGKey(0))
  before = jax.device_get(state["params"])
  batch = np.zeros((2, 64, 64, 3), np.uint8)
  # Poison one codebook entry: the rate and the loss become NaN.
  bad = jax.tree_util.tree_map_with_path(
      lambda p, v: v.at[0].set(jnp.nan) if "embedding" in jax.tree_util.keystr(p) else v,
      state["params"])
  state = dict(state, params=bad)
  new_state, m = trainer.train_step(state, batch)
  assert float(m["skipped"]) == 1.0
  after = jax.device_get(new_state["params"])
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(after)[0], jax.tree.leaves(before)):
    if "embedding" not in jax.tree_util.keystr(p):
      np.testing.assert_array_equal(x, y)


def test_bad_config_values_are_named():
  c = _train_config(1)
  c.granularity.ratios = (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="sum"):
    train.Trainer(c)
  c = _train_config(1)
  c.image_size = 72
  with pytest.raises(ValueError, match="image_size"):
    train.Trainer(c)


@pytest.mark.slow
def test_higher_lambda_gives_lower_bpp(tmp_path):
  bpp = {}
  for lm in (0.05, 5.0):
    c = micro_config()
    c.model.lambda_conditioning = False
    c.rd.lmbda, c.rd.lambdas = lm, (lm,)
    c.train.batch_size, c.train.num_steps, c.train.log_every = 4, 150, 50
    c.train.async_checkpoint = False
    c.eval.image_size = 192
    out = train.train_and_evaluate(c, str(tmp_path / str(lm)), progress=False)
    bpp[lm] = out["eval"][f"{lm:g}"]["bpp"]
  assert bpp[5.0] < 0.8 * bpp[0.05], bpp
