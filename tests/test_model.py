"""Whole-model properties: shapes, sent-index counts, gradients to every part."""
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hvq_jax.nn import model as model_lib
from hvq_jax import layout
from hvq_jax.layout import GRANULARITIES


def _apply(model, params, x, ratios, training=False, lmbda=1.0):
  return _jit_apply(model, params, x, ratios, training, lmbda)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jit_apply(model, params, x, ratios, training, lmbda):
  return model.apply({"params": params}, x, jnp.full((x.shape[0],), lmbda),
                     jnp.asarray(ratios, jnp.float32), training=training,
                     rngs={"noise": jax.random.PRNGKey(0)})


@pytest.mark.parametrize("hw", [(37, 53), (64, 48)])
def test_odd_sizes_pad_and_crop(micro, hw):
  cfg, model, params = micro
  x = jax.random.uniform(jax.random.PRNGKey(1), (2,) + hw + (3,), minval=-1, maxval=1)
  out = _apply(model, params, x, (0.1, 0.4, 0.5))
  assert out["recon"].shape == x.shape and out["recon"].dtype == jnp.float32
  hc, wc = -(-hw[0] // 16), -(-hw[1] // 16)
  assert out["gmap"].shape == (2, hc, wc)
  for g, s in zip(GRANULARITIES, cfg.model.strides):
    assert out["indices"][g].shape == (2, hc * 16 // s, wc * 16 // s)
  total = sum(out["bits"].values())
  np.testing.assert_allclose(out["bpp"], total / (hw[0] * hw[1]), rtol=1e-6)


@pytest.mark.parametrize("ratios", [(1, 0, 0), (0.1, 0.4, 0.5)])
def test_index_counts_follow_map(micro, ratios):
  _, model, params = micro
  x = jax.random.uniform(jax.random.PRNGKey(2), (1, 64, 80, 3), minval=-1, maxval=1)
  out = _apply(model, params, x, ratios)
  gmap = np.asarray(out["gmap"])
  per_patch = {"coarse": 1, "medium": 4, "fine": 16}
  for gi, g in enumerate(GRANULARITIES):
    assert int(out["masks"][g].sum()) == per_patch[g] * int((gmap == gi).sum())
  if ratios == (1, 0, 0):
    assert (gmap == 0).all()
    assert float(out["bits"]["y_medium"][0]) == 0 and float(out["bits"]["y_fine"][0]) == 0


def _leaves_with(params, needle):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(jax.tree_util.keystr(p), v) for p, v in flat if needle in jax.tree_util.keystr(p)]


def test_gradients_reach_every_part(micro):
  _, model, params = micro
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 64, 64, 3), minval=-1, maxval=1)

  def loss(p):
    out = _apply(model, p, x, (0.2, 0.3, 0.5), training=True)
    return (jnp.mean(out["bpp"]) + jnp.mean(jnp.abs(out["recon"] - x))
            + out["codebook_loss"] + 0.25 * out["commitment_loss"])

  grads = jax.jit(jax.grad(loss))(params)
  for part in ["encoder", "decoder", "codebook", "analysis_down", "synthesis_up", "bottleneck"]:
    leaves = _leaves_with(grads, part)
    assert leaves, part
    norms = [float(jnp.linalg.norm(v)) for _, v in leaves]
    assert all(np.isfinite(norms)), part
    assert sum(norms) > 0, part


def test_rate_gradient_reaches_encoder_through_straight_through(micro):
  _, model, params = micro
  x = jax.random.uniform(jax.random.PRNGKey(4), (1, 64, 64, 3), minval=-1, maxval=1)

  def y_bits(p):
    out = _apply(model, p, x, (0.0, 0.0, 1.0), training=True)
    return jnp.sum(out["bits"]["y_fine"])

  g = jax.jit(jax.grad(y_bits))(params)
  head = _leaves_with(g, "head_fine")
  assert sum(float(jnp.linalg.norm(v)) for _, v in head) > 0


def test_bad_config_is_named():
  from tests.conftest import micro_config
  cfg = micro_config()
  cfg.model.strides = (16, 8, 6)
  with pytest.raises(model_lib.ConfigError, match="powers of two"):
    model_lib.build(cfg.model)
  cfg = micro_config()
  cfg.model.ch = 15
  with pytest.raises(model_lib.ConfigError, match="norm_groups"):
    model_lib.build(cfg.model)
  cfg = micro_config()
  cfg.model.rvq_stages = 0
  with pytest.raises(model_lib.ConfigError, match="rvq_stages"):
    model_lib.build(cfg.model)


@pytest.mark.slow   # test_ablations checks the stage sum in the fast suite
def test_residual_stages_learn_and_add_up():
  """Residual VQ: every stage's codebook and hyperprior gets a gradient, stage 1's bits
  are part of y's, and the decoder input is the sum of the two entries."""
  from tests.conftest import micro_config
  cfg = micro_config()
  cfg.model.rvq_stages = 2
  model = model_lib.build(cfg.model)
  params = model_lib.init_params(model, jax.random.PRNGKey(0))
  assert {"codebook", "codebook_s1", "hyper_fine", "hyper_fine_s1"} <= set(params)
  x = jax.random.uniform(jax.random.PRNGKey(5), (1, 64, 64, 3), minval=-1, maxval=1)

  def loss(p):
    out = _apply(model, p, x, (0.0, 0.0, 1.0), training=True)
    return jnp.mean(out["bpp"]) + out["codebook_loss"], out

  grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
  for part in ("codebook_s1", "hyper_fine_s1"):
    assert sum(float(jnp.linalg.norm(v)) for v in jax.tree.leaves(grads[part])) > 0, part
  assert set(out["indices"]) == {"coarse", "coarse_s1", "medium", "medium_s1", "fine", "fine_s1"}
  # ratios (0, 0, 1): only fine is sent; its decoder input is e0[i0] + e1[i1] (numpy)
  e0 = np.asarray(params["codebook"]["embedding"], np.float64)
  e0 = e0 / np.sqrt((e0 * e0).sum(-1, keepdims=True) + 1e-6)
  e1 = np.asarray(params["codebook_s1"]["embedding"], np.float64)
  q = e0[np.asarray(out["indices"]["fine"])] + e1[np.asarray(out["indices"]["fine_s1"])]
  rec = model.apply({"params": params}, out["indices"], out["gmap"], (64, 64),
                    method=model_lib.HVQ.decode_latents)
  zeros = lambda g: jnp.zeros(out["indices"][g].shape + (q.shape[-1],))
  rec_np = model.apply({"params": params}, {"coarse": zeros("coarse"), "medium": zeros("medium"),
                                            "fine": jnp.asarray(q, jnp.float32)},
                       out["gmap"], (64, 64), method=model_lib.HVQ.synthesize)
  np.testing.assert_allclose(np.asarray(rec), np.asarray(out["recon"]), atol=1e-4)
  np.testing.assert_allclose(np.asarray(rec_np), np.asarray(out["recon"]), atol=1e-4)


def test_z_masks_cover_sent_blocks():
  rng = np.random.default_rng(0)
  m = rng.random((2, 9, 7)) < 0.1
  zm = np.asarray(layout.z_masks({"fine": jnp.asarray(m)}, 2)["fine"])
  assert zm.shape == (2, 3, 2)
  for b in range(2):
    for i in range(3):
      for j in range(2):
        assert zm[b, i, j] == m[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].any()


def test_masked_z_costs_only_where_sent(micro):
  """With mask_z, z bits equal the entropy bottleneck's bits summed over the z mask only."""
  cfg, model, params = micro
  x = jax.random.uniform(jax.random.PRNGKey(3), (1, 64, 64, 3), minval=-1, maxval=1)
  ratios = (0.75, 0.125, 0.125)
  out = _apply(model, params, x, ratios)
  zm = layout.z_masks(out["masks"], cfg.model.hyperprior.num_down)
  want = 0.0
  for g in GRANULARITIES:
    y = out["y"][g]
    z = model.apply({"params": params}, y, method=lambda mdl, y: mdl.hyper[g].analysis(y))
    lik = model.apply({"params": params}, jnp.round(z),
                      method=lambda mdl, z: mdl.hyper[g].bottleneck.likelihood(z))
    want += float(jnp.sum(-jnp.log2(lik) * zm[g][..., None]))
  assert float(out["bits"]["z"][0]) == pytest.approx(want, rel=1e-5)
  assert int(np.asarray(zm["fine"]).sum()) == 2        # 2 fine patches -> 2 of 16 z positions
