"""The index rate model against an independent float64 scipy reference."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from scipy import stats
from scipy.special import logsumexp

from hvq_jax.entropy import rate


def reference_log_probs(mu, sigma, codebook):
  """log N(e_k; mu, diag sigma^2), normalised over the K entries, in float64."""
  mu, sigma, codebook = (np.asarray(a, np.float64) for a in (mu, sigma, codebook))
  out = np.empty(mu.shape[:-1] + (codebook.shape[0],))
  for idx in np.ndindex(mu.shape[:-1]):
    logpdf = stats.multivariate_normal(mu[idx], np.diag(sigma[idx] ** 2)).logpdf(codebook)
    out[idx] = logpdf - logsumexp(logpdf)
  return out


def random_inputs(seed, shape, k, d, sigma_range=(0.05, 2.0), dtype=np.float32):
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=shape + (d,)).astype(dtype)
  sigma = rng.uniform(*sigma_range, size=shape + (d,)).astype(dtype)
  codebook = rng.normal(size=(k, d)).astype(dtype)
  return mu, sigma, codebook


def test_index_log_probs_matches_scipy():
  mu, sigma, codebook = random_inputs(0, (3, 5), 64, 4)
  got = np.asarray(rate.index_log_probs(mu, sigma, codebook))
  want = reference_log_probs(mu, sigma, codebook)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)


def test_large_codebook_small_sigma_stable():
  mu, sigma, codebook = random_inputs(1, (4,), 16384, 4, sigma_range=(1e-3, 2e-3))
  got = np.asarray(rate.index_log_probs(mu, sigma, codebook))
  want = reference_log_probs(mu, sigma, codebook)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_bf16_inputs_computed_in_f32():
  mu, sigma, codebook = random_inputs(2, (6,), 1024, 4)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (mu, sigma, codebook)]
  got = rate.index_log_probs(*bf)
  assert got.dtype == jnp.float32
  want = reference_log_probs(*[np.asarray(a.astype(jnp.float32)) for a in bf])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [None, 7])
def test_index_bits_is_minus_log2_prob(chunk):
  mu, sigma, codebook = random_inputs(3, (2, 9), 128, 4)
  idx = np.random.default_rng(4).integers(0, 128, size=(2, 9))
  bits = np.asarray(rate.index_bits(mu, sigma, codebook, idx, chunk_size=chunk))
  lp = reference_log_probs(mu, sigma, codebook)
  want = -np.take_along_axis(lp, idx[..., None], -1)[..., 0] / np.log(2)
  np.testing.assert_allclose(bits, want, rtol=1e-5, atol=1e-4)


def test_straight_through_value_and_gradient():
  mu, sigma, codebook = random_inputs(5, (10,), 32, 4)
  idx = np.arange(10) % 32
  y = np.asarray(codebook)[idx] + 0.1
  plain = rate.index_bits(mu, sigma, codebook, idx)
  f = lambda y_: jnp.sum(rate.index_bits(mu, sigma, codebook, idx, y=y_, chunk_size=4))
  np.testing.assert_allclose(f(y), jnp.sum(plain), rtol=1e-6)  # forward value unchanged
  g = np.asarray(jax.grad(f)(jnp.asarray(y)))
  # d bits / d y = (y_st - mu) / sigma^2 / ln 2 evaluated at the chosen entry.
  want = (np.asarray(codebook)[idx] - mu) / sigma ** 2 / np.log(2)
  np.testing.assert_allclose(g, want, rtol=1e-4)


def test_sigma_scaled_straight_through_gradient():
  mu, sigma, codebook = random_inputs(6, (10,), 32, 4)
  idx = np.arange(10) % 32
  y = np.asarray(codebook)[idx] - 0.05
  f = lambda y_: jnp.sum(rate.index_bits(mu, sigma, codebook, idx, y=y_,
                                         straight_through_mode="scaled"))
  np.testing.assert_allclose(f(y), jnp.sum(rate.index_bits(mu, sigma, codebook, idx)), rtol=1e-6)
  want = (np.asarray(codebook)[idx] - mu) / np.log(2)
  np.testing.assert_allclose(np.asarray(jax.grad(f)(jnp.asarray(y))), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 5])
def test_log_prior_is_a_product_with_a_static_histogram(chunk):
  """With per-entry logits b: p(k) ∝ N(e_k; mu, sigma) * exp(b_k) (scipy reference)."""
  mu, sigma, codebook = random_inputs(5, (2, 7), 96, 4)
  rng = np.random.default_rng(6)
  b = rng.normal(scale=3.0, size=96).astype(np.float32)
  ref = reference_log_probs(mu, sigma, codebook) + b
  ref = ref - logsumexp(ref, axis=-1, keepdims=True)
  got = np.asarray(rate.index_log_probs(mu, sigma, codebook, jnp.asarray(b)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  idx = rng.integers(0, 96, size=(2, 7))
  bits = np.asarray(rate.index_bits(mu, sigma, codebook, idx, chunk_size=chunk,
                                    log_prior=jnp.asarray(b)))
  want = -np.take_along_axis(ref, idx[..., None], -1)[..., 0] / np.log(2)
  np.testing.assert_allclose(bits, want, rtol=1e-5, atol=1e-4)
  # sigma -> inf: the model is exactly the static histogram softmax(b)
  flat = np.asarray(rate.index_log_probs(mu, np.full_like(sigma, 1e6), codebook, jnp.asarray(b)))
  np.testing.assert_allclose(flat[0, 0], b - logsumexp(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 4])
def test_mixture_with_static_histogram(chunk):
  """p = (1 - eps) * p_hyper + eps * softmax(b), eps = sigmoid(m): numpy reference."""
  mu, sigma, codebook = random_inputs(8, (3, 5), 40, 4, sigma_range=(0.01, 0.1))
  rng = np.random.default_rng(9)
  b = rng.normal(scale=2.0, size=40)
  m = -1.3
  eps = 1 / (1 + np.exp(-m))
  hyper = reference_log_probs(mu, sigma, codebook) + b
  hyper = np.exp(hyper - logsumexp(hyper, axis=-1, keepdims=True))
  static = np.exp(b - logsumexp(b))
  ref = np.log((1 - eps) * hyper + eps * static)
  got = np.asarray(rate.index_log_probs(mu, sigma, codebook, jnp.asarray(b, jnp.float32), m))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  idx = rng.integers(0, 40, size=(3, 5))
  bits = np.asarray(rate.index_bits(mu, sigma, codebook, idx, chunk_size=chunk,
                                    log_prior=jnp.asarray(b, jnp.float32), mix_logit=m))
  want = -np.take_along_axis(ref, idx[..., None], -1)[..., 0] / np.log(2)
  np.testing.assert_allclose(bits, want, rtol=1e-5, atol=1e-4)
  # the mixture caps the cost of a missed index at the static code + log2(1/eps)
  assert np.all(bits <= -np.log2(static[idx]) + np.log2(1 / eps) + 1e-4)


def _reference_bits(codebook, mu, sigma, b, m, idx):
  """The bits of METHOD.md written plainly: -log2 of the (mixed) softmax at the index."""
  logits = -0.5 * jnp.sum(((codebook[None] - mu.reshape(-1, 1, mu.shape[-1]))
                           / sigma.reshape(-1, 1, sigma.shape[-1])) ** 2, -1) + b
  p = jax.nn.softmax(logits, -1)
  eps = jax.nn.sigmoid(m)
  p = (1 - eps) * p + eps * jax.nn.softmax(b)
  return -jnp.sum(jnp.log2(jnp.take_along_axis(p, idx.reshape(-1, 1), -1)))


@pytest.mark.parametrize("mode", ["exact", "scaled", "off"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_codebook_and_prior_get_the_exact_gradient_of_the_bits(mode, chunk):
  """In every straight-through mode the codebook, mu, sigma, the static logits and the
  mixture weight receive jax.grad of the independent formula: the encoder's pull is on
  top of, never instead of, the codebook's gradient."""
  mu, sigma, codebook = random_inputs(11, (2, 9), 48, 4, sigma_range=(0.2, 1.5))
  rng = np.random.default_rng(12)
  idx = jnp.asarray(rng.integers(0, 48, size=(2, 9)))
  b = jnp.asarray(rng.normal(size=48), jnp.float32)
  m = jnp.float32(-1.0)
  y = jnp.asarray(codebook)[idx] + 0.05
  ours = lambda cb, mu_, s_, b_, m_: jnp.sum(rate.index_bits(
      mu_, s_, cb, idx, y=y, chunk_size=chunk, straight_through_mode=mode, log_prior=b_,
      mix_logit=m_))
  args = (jnp.asarray(codebook), jnp.asarray(mu), jnp.asarray(sigma), b, m)
  got = jax.grad(ours, argnums=(0, 1, 2, 3, 4))(*args)
  want = jax.grad(_reference_bits, argnums=(0, 1, 2, 3, 4))(*args, idx)
  for g, w, name in zip(got, want, ("codebook", "mu", "sigma", "log_prior", "mix_logit")):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-5, err_msg=name)


def test_chosen_entry_is_pulled_toward_mu():
  """One position, no bias: d bits / d e_k* = (1 - p_k*)(e_k* - mu) / (sigma^2 ln 2)
  (numpy), so a gradient step moves the chosen entry toward mu and lowers its cost."""
  mu, sigma, codebook = random_inputs(13, (1,), 16, 4, sigma_range=(0.5, 1.0))
  k = 3
  g = np.asarray(jax.grad(lambda cb: rate.index_bits(mu, sigma, cb, jnp.asarray([k]),
                                                     y=jnp.asarray(codebook[[k]]))[0])(
      jnp.asarray(codebook)))
  p = np.exp(reference_log_probs(mu, sigma, codebook))[0, k]
  want = (1 - p) * (codebook[k] - mu[0]) / sigma[0] ** 2 / np.log(2)
  np.testing.assert_allclose(g[k], want, rtol=1e-4)
  step = codebook.copy()
  step[k] -= 0.01 * g[k]
  before = float(rate.index_bits(mu, sigma, codebook, jnp.asarray([k]))[0])
  after = float(rate.index_bits(mu, sigma, step, jnp.asarray([k]))[0])
  assert after < before


def test_large_embedding_dimension_through_matmuls():
  """D >= rate.MATMUL_MIN_DIM (taming's D=256) takes the matmul expansion: same log
  probabilities and gradients as the direct form, with entries clustered far from the
  origin (the case an uncentred expansion gets wrong)."""
  rng = np.random.default_rng(7)
  k, d = 512, 64
  codebook = (3.0 + 0.05 * rng.normal(size=(k, d))).astype(np.float32)
  idx = rng.integers(0, k, size=(2, 6))
  mu = (codebook[idx] + 0.1 * rng.normal(size=(2, 6, d))).astype(np.float32)
  sigma = rng.uniform(0.2, 0.6, size=(2, 6, d)).astype(np.float32)
  assert d >= rate.MATMUL_MIN_DIM
  want = reference_log_probs(mu, sigma, codebook)
  assert 1.0 < -np.take_along_axis(want, idx[..., None], -1).mean() / np.log(2) < 9.0   # a broad pmf
  np.testing.assert_allclose(np.asarray(rate.index_log_probs(mu, sigma, codebook)), want,
                             rtol=1e-5, atol=2e-4)
  direct = lambda m, s, e: -0.5 * jnp.sum(((e - m[..., None, :]) / s[..., None, :]) ** 2, -1)
  def bits(fn, m, s, e):
    logits = fn(m, s, e)
    lp = logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True)
    return -jnp.sum(jnp.take_along_axis(lp, jnp.asarray(idx)[..., None], -1)) / np.log(2)
  g_new = jax.grad(lambda *a: bits(rate._neg_half_mahalanobis, *a), argnums=(0, 1, 2))(mu, sigma, codebook)
  g_ref = jax.grad(lambda *a: bits(direct, *a), argnums=(0, 1, 2))(mu, sigma, codebook)
  for a, b in zip(g_new, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3 * np.abs(b).max())
