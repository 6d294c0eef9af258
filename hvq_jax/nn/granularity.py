"""Granularity map (Control-GIC): which coarse patches are sent coarse, medium or fine.

Each coarse patch is scored by its information density: the entropy of a soft 32-bin
histogram of its grayscale pixels. For ratios (r_c, r_m, r_f), the densest r_f of the
patches go fine, the next r_m medium, the rest coarse. Our choices: the map lives on the
coarse grid (one symbol per coarse patch), counts use cumulative rounding
(n_f = round(r_f N), n_f + n_m = round((r_f + r_m) N)) so each class is within one
patch of its ratio, and ties break by raster order (stable sort), so encoder and decoder
never disagree.
"""
import jax
import jax.numpy as jnp

COARSE, MEDIUM, FINE = 0, 1, 2


def patch_entropy(x: jax.Array, patch: int, bins: int = 32) -> jax.Array:
  """x [B, H, W, 3] in [-1, 1] -> entropy (nats) of each patch's soft histogram [B, H/p, W/p].

  A pixel of gray level v adds exp(-1/2 ((v - c_j) * bins)^2), normalised over bins,
  to bin j (centres c_j = (j + 1/2) / bins): a Gaussian kernel one bin wide.
  """
  b, h, w, _ = x.shape
  rgb = (x.astype(jnp.float32) + 1.0) / 2.0
  gray = rgb @ jnp.array([0.299, 0.587, 0.114], jnp.float32)
  centres = (jnp.arange(bins, dtype=jnp.float32) + 0.5) / bins
  k = jnp.exp(-0.5 * ((gray[..., None] - centres) * bins) ** 2)
  k = k / jnp.sum(k, -1, keepdims=True)
  k = k.reshape(b, h // patch, patch, w // patch, patch, bins)
  hist = jnp.mean(k, axis=(2, 4))
  return -jnp.sum(hist * jnp.log(jnp.maximum(hist, 1e-12)), axis=-1)


def class_counts(n: int, ratios: jax.Array) -> jax.Array:
  """Patches per class (coarse, medium, fine) for `n` patches: int32 [3]."""
  ratios = jnp.asarray(ratios, jnp.float32)
  n_f = jnp.round(ratios[2] * n)
  n_fm = jnp.clip(jnp.round((ratios[2] + ratios[1]) * n), n_f, n)
  return jnp.stack([n - n_fm, n_fm - n_f, n_f]).astype(jnp.int32)


def assign(scores: jax.Array, ratios: jax.Array) -> jax.Array:
  """scores [B, h, w] -> map [B, h, w] int32 in {COARSE, MEDIUM, FINE}."""
  b, h, w = scores.shape
  n = h * w
  counts = class_counts(n, ratios)
  flat = scores.reshape(b, n)
  order = jnp.argsort(-flat, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  gmap = jnp.where(rank < counts[2], FINE,
                   jnp.where(rank < counts[2] + counts[1], MEDIUM, COARSE))
  return gmap.reshape(b, h, w).astype(jnp.int32)


def granularity_map(x: jax.Array, ratios: jax.Array, patch: int, bins: int = 32) -> jax.Array:
  """x [B, H, W, 3] in [-1, 1], ratios (r_c, r_m, r_f) -> map [B, H/patch, W/patch]."""
  return assign(jax.lax.stop_gradient(patch_entropy(x, patch, bins)), ratios)


def map_bits(gmap: jax.Array, ratios: jax.Array) -> jax.Array:
  """Bits to code the map with the class frequencies fixed by the ratios: [B].

  The decoder knows the counts from the ratios in the header, so each symbol costs
  -log2(n_g / N) (classes with no patch never occur).
  """
  b = gmap.shape[0]
  n = gmap[0].size
  counts = class_counts(n, ratios).astype(jnp.float32)
  p = jnp.take(counts, gmap.reshape(b, n)) / n
  return -jnp.sum(jnp.log2(jnp.maximum(p, 1e-12)), axis=-1)
