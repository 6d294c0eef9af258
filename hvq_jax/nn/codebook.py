"""Vector quantiser: nearest codebook entry, straight-through, VQ losses, usage."""
from typing import Any, Dict

import jax
import jax.numpy as jnp
import flax.linen as nn


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def nearest_indices(y: jax.Array, codebook: jax.Array) -> jax.Array:
  """argmin_k ||y - e_k||^2 for y [..., D], codebook [K, D] -> int32 [...]."""
  d = (jnp.sum(y * y, -1, keepdims=True) - 2 * y @ codebook.T
       + jnp.sum(codebook * codebook, -1))
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


class Codebook(nn.Module):
  """K entries of dimension D, initialised U(-s, s) (taming-transformers: s = 1/K).

  With `l2_normalized`, both features and entries live on the unit sphere.
  """
  size: int
  dim: int
  l2_normalized: bool = False
  init_scale: float = 0.0           # 0: taming's 1/K

  def setup(self):
    bound = self.init_scale or 1.0 / self.size
    self.embedding = self.param(
        "embedding",
        lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound),
        (self.size, self.dim))

  def entries(self) -> jax.Array:
    e = self.embedding
    return l2_normalize(e) if self.l2_normalized else e

  def __call__(self, y: jax.Array) -> Dict[str, Any]:
    """y: [..., D] float32 -> quantised values (straight-through) and losses.

    Returns y_in (the vector compared, normalised when configured), q (the entry,
    straight-through), indices [...], codebook_loss and commitment_loss (means).
    """
    e = self.entries()
    y_in = l2_normalize(y) if self.l2_normalized else y
    idx = nearest_indices(y_in, e)
    q = jnp.take(e, idx, axis=0)
    codebook_loss = jnp.mean((jax.lax.stop_gradient(y_in) - q) ** 2)
    commitment_loss = jnp.mean((y_in - jax.lax.stop_gradient(q)) ** 2)
    q_st = y_in + jax.lax.stop_gradient(q - y_in)
    return dict(y=y_in, q=q_st, q_exact=q, indices=idx,
                codebook_loss=codebook_loss, commitment_loss=commitment_loss)


def usage_stats(indices: jax.Array, mask: jax.Array, size: int) -> Dict[str, jax.Array]:
  """Counts of each entry among sent positions, perplexity and fraction used."""
  counts = jnp.zeros((size,), jnp.float32).at[indices.reshape(-1)].add(
      mask.reshape(-1).astype(jnp.float32))
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return dict(counts=counts, perplexity=jnp.exp(entropy),
              used_fraction=jnp.mean((counts > 0).astype(jnp.float32)))
