"""hyperprior.context='coarser': each granularity's prior also reads the map and
the coarser granularities' decoded entries. The integer twin follows the float prior, files
round-trip with the encoder's symbols, PyTorch prices and decodes them the same way."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hvq_jax import codec, colour, images, layout
from hvq_jax.entropy import bitstream
from hvq_jax.codec import profile
from hvq_jax.entropy import integer
from hvq_jax.layout import GRANULARITIES
from hvq_jax.nn import model as model_lib
from tests.conftest import micro_config


def _config():
  c = micro_config()
  c.model.hyperprior.context = "coarser"
  return c


@pytest.fixture(scope="module")
def ctx_model():
  c = _config()
  m = model_lib.build(c.model)
  params = model_lib.init_params(m, jax.random.PRNGKey(3))
  # a trained-like context path: the init's small weights would hide a wiring mistake
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 3.0 if "context" in jax.tree_util.keystr(p) else v, params)
  return c, m, params


def test_context_map_reads_only_what_the_decoder_has():
  """A numpy reference from the definition: coarser entries where sent (repeated onto the
  grid), own mask, nothing of the finer granularities or of unsent positions."""
  rng = np.random.default_rng(0)
  strides, d = (16, 8, 4), 2
  gmap = rng.integers(0, 3, (1, 2, 3))
  masks = {g: m[0] for g, m in layout.sent_masks(gmap, strides).items()}
  entries = {g: rng.integers(-900, 900, (5, d)) for g in GRANULARITIES}
  idx = {g: rng.integers(0, 5, masks[g].shape) for g in GRANULARITIES}
  bits = 12
  one = 1 << bits
  ctx = integer.context_map("fine", masks, idx, entries, strides, bits)
  assert ctx.shape == masks["fine"].shape + (3 * (d + 1),)
  for y in range(ctx.shape[0]):
    for x in range(ctx.shape[1]):
      c = gmap[0, y // 4, x // 4]                 # the coarse patch covering (y, x)
      want = np.zeros(3 * (d + 1), np.int64)
      if c == 0:
        want[:d] = entries["coarse"][idx["coarse"][y // 4, x // 4]]
        want[d] = one
      elif c == 1:
        want[d + 1:2 * d + 1] = entries["medium"][idx["medium"][y // 2, x // 2]]
        want[2 * d + 1] = one
      else:
        want[3 * d + 2] = one
      np.testing.assert_array_equal(ctx[y, x], want)
  # changing a finer granularity's (not yet decoded) indices changes nothing
  idx2 = dict(idx, fine=idx["fine"] + 1)
  np.testing.assert_array_equal(ctx, integer.context_map("fine", masks, idx2, entries, strides, bits))


@pytest.mark.parametrize("small_entries", [False, True])
def test_integer_prior_with_context_follows_the_float_one(ctx_model, small_entries):
  c, m, params = ctx_model
  if small_entries:   # the default config's codebook: unnormalised, taming's U(-1/K, 1/K) init
    c = _config()
    c.model.l2_normalized = False
    m = model_lib.build(c.model)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 1e-3 if "embedding" in jax.tree_util.keystr(p) else v, params)
  host = jax.device_get(params)
  ent = np.asarray(m.apply({"params": params}, "fine", method=model_lib.HVQ.codebook_entries),
                   np.float64)
  assert (np.abs(ent).max() < 2e-3) == small_entries
  tabs = codec.build_tables(params, c.model, dict(z_range=64, weight_bits=12))
  rng = np.random.default_rng(1)
  strides, n = tuple(c.model.strides), c.model.hyperprior.num_down
  gmap = rng.integers(0, 3, (1, 3, 4))
  masks = layout.sent_masks(gmap, strides)
  idx = {g: rng.integers(0, c.model.codebook_size, mk.shape[1:]) for g, mk in masks.items()}
  q = {g: jnp.asarray(ent[idx[g]][None], jnp.float32) for g in idx}
  for g in GRANULARITIES:
    t, grid = tabs[g], masks[g].shape[1:]
    ctx_i = integer.context_map(g, {k: v[0] for k, v in masks.items()}, idx,
                                {k: tabs[k].ctx_entries for k in tabs}, strides, t.ctx_bits)
    ctx_f = m.apply({"params": params}, g, q, {k: jnp.asarray(v) for k, v in masks.items()},
                    method=model_lib.HVQ.prior_context)
    assert np.abs(np.asarray(ctx_f[0]) - ctx_i / 2.0 ** t.ctx_bits).max() <= 2.0 ** -t.ctx_bits
    # the entries keep ~10 significant bits whatever the codebook's scale
    assert np.abs(t.ctx_entries).max() >= 2 ** 9
    z = rng.integers(-6, 7, layout.z_grid(*grid, n) + (c.model.hyperprior.latent_channels,))
    mu_q, ls_q = integer.synthesis(t, z, grid, ctx_i)
    mu, sigma = jax.device_get(m.apply({"params": params}, g, jnp.asarray(z[None], jnp.float32),
                                       grid, ctx_f, method=model_lib.HVQ.prior))
    lim = 2.0 ** (14 - t.mu_bits)        # the integer mu's range: 16x the codebook's
    mu_ref = np.clip(mu[0], -lim, lim)
    # (activations have an absolute grid: the error scales with the network's output)
    assert np.abs(mu_q / 2.0 ** t.mu_bits - mu_ref).max() <= 5e-3 * np.abs(mu).max() + 2.0 ** -t.mu_bits
    ls_ref = np.clip(np.log(sigma[0]), t.ls_lo / 256, t.ls_hi / 256)
    assert np.abs(ls_q / 256.0 - ls_ref).max() <= 3e-3 * np.abs(ls_ref).max() + 1 / 256
    # and the context matters: without it (zeros) the prior differs
    mu0, _ = integer.synthesis(t, z, grid, np.zeros_like(ctx_i))
    if g != "coarse" or masks[g].any():
      assert not np.array_equal(mu0, mu_q)
  with pytest.raises(integer.IntegerModelError, match="context"):
    integer.synthesis(tabs["fine"], z, grid)


def test_context_files_round_trip_and_decode_in_torch(ctx_model, tmp_path):
  c, m, params = ctx_model
  cm = codec.CodecModel(c, params)
  img = images.bundled_photo("coffee")[:64, :80]
  data, stats = profile.compress(cm, img, ratios=(0.3, 0.3, 0.4))
  _, idx, gmap = codec.decode_indices(cm, data)
  enc = codec.encode_latents(cm, img, cm.default_lmbda,
                             (0.3, 0.3, 0.4))
  masks = layout.sent_masks(np.asarray(gmap), tuple(c.model.strides))
  np.testing.assert_array_equal(gmap, enc["gmap"])
  for g in GRANULARITIES:
    np.testing.assert_array_equal(idx[g][masks[g]], np.asarray(enc["indices"][g])[masks[g]])
  # the file costs what the float model estimates (integer tables within a few %)
  x = jnp.asarray(img, jnp.float32)[None] / 127.5 - 1
  ref = jax.device_get(jax.jit(m.apply)({"params": params}, x, jnp.full((1,), cm.default_lmbda),
                               jnp.asarray((0.3, 0.3, 0.4), jnp.float32)))
  est_y = sum(float(ref["bits"][f"y_{g}"][0]) for g in GRANULARITIES)
  got_y = sum(v for k, v in stats["bits"].items() if k.startswith("y"))
  assert abs(got_y - est_y) <= 0.03 * est_y + 32, (got_y, est_y)
  torch = pytest.importorskip("torch")
  from hvq_jax.interop import export, torch_model
  path = str(tmp_path / "ctx.safetensors")
  export.save_torch(params, c, path, coding=cm)
  net = torch_model.from_safetensors(path)
  out = net(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), cm.default_lmbda, (0.3, 0.3, 0.4))
  for k, v in ref["bits"].items():
    np.testing.assert_allclose(out["bits"][k].numpy(), v, rtol=1e-4, atol=1e-3, err_msg=k)
  got = torch_model.decompress(net, data)
  tol = colour.bound(bitstream.unpack(data)[0].colour)   # a level, times the file's gains
  assert np.abs(got.astype(int) - codec.decompress(cm, data).astype(int)).max() <= tol
  # no coarse position sent: the context of medium and fine has an empty coarse part
  data0 = codec.compress(cm, img, ratios=(0.0, 0.5, 0.5))
  _, idx0, gmap0 = codec.decode_indices(cm, data0)
  assert not (np.asarray(gmap0) == 0).any()
  enc0 = codec.encode_latents(cm, img, cm.default_lmbda, (0.0, 0.5, 0.5))
  masks0 = layout.sent_masks(np.asarray(gmap0), tuple(c.model.strides))
  for g in ("medium", "fine"):
    np.testing.assert_array_equal(idx0[g][masks0[g]], np.asarray(enc0["indices"][g])[masks0[g]])
  assert np.abs(torch_model.decompress(net, data0).astype(int)
                - codec.decompress(cm, data0).astype(int)).max() <= colour.bound(
                    bitstream.unpack(data0)[0].colour)


def test_context_needs_a_single_stage_and_a_known_name():
  c = _config()
  c.model.rvq_stages = 2
  with pytest.raises(model_lib.ConfigError, match="context"):
    model_lib.validate(c.model)
  c = _config()
  c.model.hyperprior.context = "finer"
  with pytest.raises(model_lib.ConfigError, match="context"):
    model_lib.validate(c.model)
  c = _config()
  c.model.hyperprior.enabled = False
  with pytest.raises(model_lib.ConfigError, match="context"):
    model_lib.validate(c.model)
