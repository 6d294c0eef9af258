"""Factorized prior: a numpy re-implementation of Ballé's density from the params."""
import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax.entropy.bottleneck import EntropyBottleneck


def numpy_cumulative_logits(params, x, n_layers):
  """x [C, N] float64 -> logits of the cumulative, [C, N]."""
  h = x[:, None, :]
  softplus = lambda a: np.log1p(np.exp(a))
  for i in range(n_layers):
    h = softplus(np.asarray(params[f"matrix{i}"], np.float64)) @ h + np.asarray(params[f"bias{i}"])
    if i < n_layers - 1:
      h = h + np.tanh(np.asarray(params[f"factor{i}"])) * np.tanh(h)
  return h[:, 0]


def _init(channels=3):
  eb = EntropyBottleneck(channels)
  params = eb.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, channels)), False)["params"]
  # Move off the symmetric init so the test sees a non-trivial density.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  return eb, params


def test_likelihoods_sum_to_one_over_integers():
  eb, params = _init()
  grid = jnp.arange(-300, 301, dtype=jnp.float32)
  z = jnp.broadcast_to(grid[:, None], (grid.size, 3))
  lik = eb.apply({"params": params}, z, method=eb.likelihood)
  np.testing.assert_allclose(np.asarray(lik).sum(0), 1.0, atol=1e-4)


def test_bits_match_numpy_density():
  eb, params = _init()
  z = np.random.default_rng(0).normal(scale=4, size=(2, 3, 5, 3)).astype(np.float32)
  z_hat, bits = eb.apply({"params": params}, jnp.asarray(z), False)
  np.testing.assert_array_equal(np.asarray(z_hat), np.round(z))
  v = np.moveaxis(np.round(z).reshape(-1, 3), -1, 0).astype(np.float64)
  sig = lambda a: 1 / (1 + np.exp(-a))
  lik = sig(numpy_cumulative_logits(params, v + 0.5, 4)) - sig(numpy_cumulative_logits(params, v - 0.5, 4))
  want = -np.log2(np.maximum(lik, 1e-9))
  want = np.moveaxis(want, 0, -1).reshape(z.shape)
  np.testing.assert_allclose(np.asarray(bits), want, rtol=1e-4, atol=1e-4)


def test_training_adds_uniform_noise():
  eb, params = _init()
  z = jnp.zeros((1, 64, 64, 3))
  z_t, _ = eb.apply({"params": params}, z, True, rngs={"noise": jax.random.PRNGKey(3)})
  assert float(jnp.abs(z_t).max()) <= 0.5 and float(jnp.std(z_t)) > 0.25


def test_likelihood_where_the_cdf_logits_cancel():
  """Zero biases and gates make the CDF logit odd (l(-x) = -l(x)): at z = 0 the two
  logits sum to exactly 0, where a sign(lower + upper) trick returns a zero likelihood."""
  eb = EntropyBottleneck(2)
  params = eb.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), training=False)["params"]
  params = {k: (jnp.zeros_like(v) if k.startswith(("bias", "factor")) else v)
            for k, v in params.items()}
  lik = np.asarray(eb.apply({"params": params}, jnp.zeros((1, 2)), method=EntropyBottleneck.likelihood))
  sp = lambda m: np.log1p(np.exp(np.asarray(m, np.float64)))
  a = np.ones((2, 1, 1))
  for i in range(4):      # the logit is linear: the product of the softplus matrices
    a = sp(params[f"matrix{i}"]) @ a
  slope = a[:, 0, 0]
  want = 1 / (1 + np.exp(-slope / 2)) - 1 / (1 + np.exp(slope / 2))
  np.testing.assert_allclose(lik[0], want, rtol=1e-5)
