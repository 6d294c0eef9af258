"""Ballé et al. 2018 factorized non-parametric density for the hyper-latent z.

Per channel, a monotone cumulative c(x) = sigmoid(f_K(...f_1(x))) with softplus
matrices and tanh gates (CompressAI's `EntropyBottleneck`, filters (3, 3, 3),
init_scale 10). P(z_hat = n) = c(n + 1/2) - c(n - 1/2).
"""
from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

LIKELIHOOD_BOUND = 1e-9


class EntropyBottleneck(nn.Module):
  channels: int
  filters: Sequence[int] = (3, 3, 3)
  init_scale: float = 10.0

  def setup(self):
    dims = (1,) + tuple(self.filters) + (1,)
    scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
    mats, biases, factors = [], [], []
    for i in range(len(self.filters) + 1):
      init = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
      mats.append(self.param(f"matrix{i}", nn.initializers.constant(init),
                             (self.channels, dims[i + 1], dims[i])))
      biases.append(self.param(
          f"bias{i}", lambda k, s: jax.random.uniform(k, s, minval=-0.5, maxval=0.5),
          (self.channels, dims[i + 1], 1)))
      if i < len(self.filters):
        factors.append(self.param(f"factor{i}", nn.initializers.zeros,
                                  (self.channels, dims[i + 1], 1)))
    self.matrices, self.biases, self.factors = mats, biases, factors

  def logits_cumulative(self, x: jax.Array) -> jax.Array:
    """x: [C, 1, N] -> logits of c(x), [C, 1, N] (float32)."""
    h = x
    for i in range(len(self.filters) + 1):
      h = jnp.matmul(jax.nn.softplus(self.matrices[i]), h) + self.biases[i]
      if i < len(self.filters):
        h = h + jnp.tanh(self.factors[i]) * jnp.tanh(h)
    return h

  def likelihood(self, z_hat: jax.Array) -> jax.Array:
    """P(z_hat) for z_hat [..., C] on the integer grid (or noisy), same shape."""
    shape = z_hat.shape
    v = jnp.moveaxis(z_hat.astype(jnp.float32).reshape(-1, self.channels), -1, 0)[:, None]
    lower = self.logits_cumulative(v - 0.5)
    upper = self.logits_cumulative(v + 0.5)
    # Subtract in the tail where both sigmoids are far from 1 (stable, as in CompressAI);
    # the sign is never 0 (jnp.sign would give 0, and a zero likelihood, at lower = -upper).
    sign = jax.lax.stop_gradient(jnp.where(lower + upper > 0, -1.0, 1.0))
    lik = jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))
    lik = jnp.maximum(lik, LIKELIHOOD_BOUND)
    return jnp.moveaxis(lik[:, 0], 0, -1).reshape(shape)

  def __call__(self, z: jax.Array, training: bool) -> tuple:
    """Quantise z (uniform noise when training, rounding otherwise) and price it.

    Returns (z_hat, bits) with bits = -log2 P(z_hat), same shape as z.
    """
    if training:
      noise = jax.random.uniform(self.make_rng("noise"), z.shape, minval=-0.5, maxval=0.5)
      z_hat = z + noise
    else:
      z_hat = jnp.round(z)
    return z_hat, -jnp.log2(self.likelihood(z_hat))
