"""Losses against independent numpy formulas."""
import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax.training import losses
from hvq_jax.nn.codebook import Codebook


def test_hinge_losses():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(4, 5, 5, 1)), rng.normal(size=(4, 5, 5, 1))
  want_d = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
  np.testing.assert_allclose(losses.hinge_d(jnp.asarray(real), jnp.asarray(fake)), want_d, rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_g(jnp.asarray(fake)), -fake.mean(), rtol=1e-6)


def test_adaptive_weight():
  rng = np.random.default_rng(1)
  g1, g2 = rng.normal(size=(3, 3, 8, 3)), 1e-3 * rng.normal(size=(3, 3, 8, 3))
  want = np.linalg.norm(g1) / (np.linalg.norm(g2) + 1e-4)
  np.testing.assert_allclose(losses.adaptive_weight(jnp.asarray(g1), jnp.asarray(g2)), want, rtol=1e-5)
  # Clipped at 1e4 and never differentiated.
  assert float(losses.adaptive_weight(jnp.ones(3), jnp.zeros(3))) == 1e4
  g = jax.grad(lambda a: losses.adaptive_weight(a, jnp.ones(3)))(jnp.ones(3))
  assert float(jnp.abs(g).sum()) == 0.0


def test_vq_losses_and_straight_through():
  cb = Codebook(16, 4, init_scale=1.0)
  y = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
  params = cb.init(jax.random.PRNGKey(1), y)
  out = cb.apply(params, y)
  e = np.asarray(params["params"]["embedding"], np.float64)
  yn = np.asarray(y, np.float64).reshape(-1, 4)
  nearest = np.argmin(((yn[:, None] - e[None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(np.asarray(out["indices"]).reshape(-1), nearest)
  mse = ((yn - e[nearest]) ** 2).mean()
  np.testing.assert_allclose(out["codebook_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(out["commitment_loss"], mse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["q"]).reshape(-1, 4), e[nearest], rtol=1e-6)
  # Straight-through: d sum(q) / dy = 1; commitment pulls y, codebook loss pulls e.
  g = jax.grad(lambda y_: jnp.sum(cb.apply(params, y_)["q"]))(y)
  np.testing.assert_allclose(np.asarray(g), 1.0)
  gc = jax.grad(lambda p: cb.apply(p, y)["commitment_loss"])(params)
  assert float(jnp.abs(gc["params"]["embedding"]).sum()) == 0.0
