"""The integer entropy path: exact integers, close to the float model they replace, the same
in numpy and on the JAX device, and used exactly by constriction."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import constriction

from hvq_jax import layout
from hvq_jax.entropy import integer
from hvq_jax.entropy.bottleneck import EntropyBottleneck
from hvq_jax.nn import model as model_lib

T = 1 << integer.PRECISION


def test_deterministic_elementary_functions_are_accurate():
  x = np.linspace(-40, 40, 20001)
  np.testing.assert_allclose(integer.det_exp(x), np.exp(x), rtol=4e-16)
  y = np.exp(np.linspace(-30, 30, 20001))
  np.testing.assert_allclose(integer.det_log(y), np.log(y), rtol=0, atol=5e-16 * 30)
  np.testing.assert_allclose(integer.det_tanh(x), np.tanh(x), atol=3e-16)
  np.testing.assert_allclose(integer.det_sigmoid(x), 1 / (1 + np.exp(-x)), atol=3e-16)
  np.testing.assert_allclose(integer.det_softplus(x), np.logaddexp(0, x), rtol=1e-15, atol=1e-15)
  g = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  np.testing.assert_allclose(integer.det_gelu(x), g, atol=1e-14)


def _random_branch(rng, k=64, d=4, sigma_range=(1e-3, 1e2), mix=0.1):
  e = rng.normal(size=(k, d))
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  bias = rng.normal(size=k) * 2.0
  t = integer.BranchTables(None, (), **integer.index_tables(e, bias, mix, sigma_range))
  return e, bias, t


def _float_pmf(e, bias, mu, sigma, mix):
  """Independent float64 reference: softmax of -1/2 Mahalanobis + bias, mixed with the
  static softmax(bias)."""
  d = (e[None] - mu[:, None]) / sigma[:, None]
  logits = -0.5 * (d * d).sum(-1) + bias
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  s = np.exp(bias - bias.max())
  return (1 - mix) * p + mix * s / s.sum()


def _weights(t, mu_q, ls_q, xp=np):
  return integer.index_weights(xp.asarray(mu_q, xp.int32), xp.asarray(ls_q, xp.int32),
                               xp.asarray(t.codebook), xp.asarray(t.inv_mant),
                               xp.asarray(t.inv_shift), xp.asarray(t.bias), xp.asarray(t.static),
                               xp.asarray(integer.EXP_TABLE), t.ls_lo, t.total_hyper, xp=xp)


@pytest.mark.parametrize("seed", [0, 1])
def test_index_weights_match_float_model_and_sum_exactly(seed):
  rng = np.random.default_rng(seed)
  e, bias, t = _random_branch(rng)
  n = 512
  mu = e[rng.integers(0, len(e), n)] + rng.normal(size=(n, 4)) * 0.3
  sigma = np.exp(rng.uniform(np.log(0.05), np.log(2.0), (n, 4)))
  mu_q = np.rint(np.ldexp(mu, t.mu_bits)).astype(np.int32)
  ls_q = np.clip(np.rint(np.log(sigma) * 256), t.ls_lo, t.ls_hi).astype(np.int32)
  w = _weights(t, mu_q, ls_q)
  assert w.dtype == np.int32 and w.min() >= 0
  np.testing.assert_array_equal(w.astype(np.int64).sum(1), T - len(e))
  p_int = (w + 1.0) / T
  p = _float_pmf(e, bias, mu_q / 2.0 ** t.mu_bits, np.exp(ls_q / 256.0), 0.1)
  kl_bits = (p * np.log2(p / p_int)).sum(-1)
  assert kl_bits.max() < 2e-3, kl_bits.max()        # cost of the integer path per index


def test_index_weights_numpy_jax_and_int64_agree_at_the_bounds():
  """The same integers in numpy int32, numpy int64 (no overflow possible) and jitted
  jax.numpy, on extreme inputs: mu at the clip, sigma at both ends of its range."""
  rng = np.random.default_rng(3)
  e, bias, t = _random_branch(rng, k=256, sigma_range=(1e-4, 1e2))
  n = 300
  mu_q = rng.integers(-(1 << 14), (1 << 14) + 1, (n, 4)).astype(np.int32)
  mu_q[:20] = 1 << 14
  mu_q[20:40] = -(1 << 14)
  ls_q = rng.integers(t.ls_lo, t.ls_hi + 1, (n, 4)).astype(np.int32)
  ls_q[::7] = t.ls_lo
  ls_q[1::7] = t.ls_hi
  w32 = _weights(t, mu_q, ls_q)
  w64 = integer.index_weights(mu_q.astype(np.int64), ls_q.astype(np.int64),
                              t.codebook.astype(np.int64), t.inv_mant.astype(np.int64),
                              t.inv_shift.astype(np.int64), t.bias.astype(np.int64),
                              t.static.astype(np.int64), integer.EXP_TABLE.astype(np.int64),
                              t.ls_lo, t.total_hyper)
  np.testing.assert_array_equal(w32, w64)
  wj = jax.jit(lambda m, l: _weights(t, m, l, jnp))(mu_q, ls_q)
  np.testing.assert_array_equal(np.asarray(wj), w32)


def test_constriction_uses_integer_weights_exactly():
  """Weights summing to 2^24 - A give constriction's lazy categorical a scale of exactly 1:
  the compressed size equals the sum of -log2((w + 1) / 2^24) to within the coder's
  few-word overhead, including symbols of weight 0 (exactly 24 bits each)."""
  rng = np.random.default_rng(0)
  a = 40
  raw = rng.integers(0, 5000, a) * (rng.random(a) < 0.6)
  w = integer._normalise(raw, T - a)
  assert w.sum() == T - a
  sym = np.concatenate([rng.choice(a, 3000, p=(w + 1) / T), np.flatnonzero(w == 0)[:5].repeat(50)])
  want = float(integer.code_lengths(np.broadcast_to(w, (len(sym), a)), sym).sum())
  for dtype in (np.float32, np.float64):
    enc = constriction.stream.queue.RangeEncoder()
    fam = constriction.stream.model.Categorical(perfect=False)
    probs = np.broadcast_to(w.astype(dtype), (len(sym), a)).copy()
    enc.encode(sym.astype(np.int32), fam, probs)
    bits = 32 * len(enc.get_compressed())
    assert want <= bits <= want + 64, (bits, want)
    dec = constriction.stream.queue.RangeDecoder(enc.get_compressed())
    np.testing.assert_array_equal(dec.decode(fam, probs), sym)


def test_z_tables_match_the_float_bottleneck():
  eb = EntropyBottleneck(3)
  params = eb.init(jax.random.PRNGKey(1), jnp.zeros((1, 3)), training=False)["params"]
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                        params)
  r = 16
  w = integer.z_weights(jax.device_get(params), r)
  np.testing.assert_array_equal(w.sum(1), T - (2 * r + 1))
  grid = jnp.broadcast_to(jnp.arange(-r, r + 1, dtype=jnp.float32)[:, None], (2 * r + 1, 3))
  p = np.asarray(eb.apply({"params": params}, grid, method=EntropyBottleneck.likelihood)).T
  inner = (slice(None), slice(1, -1))            # the end symbols also hold the tails
  np.testing.assert_allclose((w[inner] + 1.0) / T, p[inner], rtol=2e-3, atol=2e-7)


def test_integer_synthesis_follows_the_float_one(micro):
  cfg, model, params = micro
  host = jax.device_get(params)
  t = integer.build_branch(host["hyper_fine"], np.asarray(model.apply(
      {"params": params}, "fine", method=model_lib.HVQ.codebook_entries), np.float64),
      True, cfg.model, dict(z_range=64, weight_bits=12))
  rng = np.random.default_rng(0)
  z = rng.integers(-6, 7, (3, 5, cfg.model.hyperprior.latent_channels))
  grid = (3 * 2 ** cfg.model.hyperprior.num_down - 1, 5 * 2 ** cfg.model.hyperprior.num_down)
  mu_q, ls_q = integer.synthesis(t, z, grid)
  mu, sigma = jax.device_get(model.apply({"params": params}, "fine", jnp.asarray(z[None], jnp.float32),
                                         grid, method=model_lib.HVQ.prior))
  scale = np.abs(mu).max()
  assert np.abs(mu_q / 2.0 ** t.mu_bits - mu[0]).max() <= 5e-3 * scale + 2.0 ** -t.mu_bits
  ls_ref = np.clip(np.log(sigma[0]), t.ls_lo / 256, t.ls_hi / 256)
  assert np.abs(ls_q / 256.0 - ls_ref).max() <= 3e-3 * np.abs(ls_ref).max() + 1 / 256


def test_layout_masks_numpy_and_jax_agree():
  rng = np.random.default_rng(0)
  gmap = rng.integers(0, 3, (2, 3, 5)).astype(np.int32)
  a = layout.sent_masks(gmap, (16, 8, 4))
  b = layout.sent_masks(jnp.asarray(gmap), (16, 8, 4), jnp)
  for g in a:
    np.testing.assert_array_equal(a[g], np.asarray(b[g]))
    assert a[g].shape == (2, 3 * 16 // {"coarse": 16, "medium": 8, "fine": 4}[g],
                          5 * 16 // {"coarse": 16, "medium": 8, "fine": 4}[g])
  za, zb = layout.z_masks(a, 2), layout.z_masks(b, 2, jnp)
  for g in za:
    np.testing.assert_array_equal(za[g], np.asarray(zb[g]))
