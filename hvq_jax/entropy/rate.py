"""The hyperprior's rate model for VQ indices (METHOD.md step 5).

p(k | z_hat) is N(mu, diag sigma^2) evaluated at every codebook entry and normalised
over the K entries: a softmax over negative Mahalanobis distances. All maths in f32
whatever the input dtype.

Optional `log_prior` [K]: a learned static logit per entry added to every position's
logits (our choice, config `model.hyperprior.index_bias`). The Gaussian alone must give
mass to every entry near mu, used or not; a VQ codebook has many rarely used entries,
so without the bias the hyperprior can lose to a static histogram of the indices. With
it the model contains the static histogram (sigma -> inf) and the pure hyperprior (bias 0).

Optional `mix_logit` (a scalar): the final PMF is the mixture
  (1 - eps) * p_hyper + eps * softmax(log_prior),  eps = sigmoid(mix_logit),
so an index the Gaussian misses costs at most the static code plus log2(1/eps) bits
instead of up to the coder's 24-bit floor (our choice, `model.hyperprior.index_mixture`;
measured on the tiny model: 13% of fine indices cost > 10 bits without it).

Memory: pricing P positions materialises a [P, K] logit block. `index_bits` can walk
each example's positions in chunks under `jax.checkpoint`, so forward and backward hold
only [batch, chunk, K] at a time (the chunk is a config field, `model.rate_chunk`). The
leading (batch) dimension is never folded into the chunks, so under a batch-sharded
mesh every device prices only its own examples: [positions, K] is never gathered.
"""
import math
from typing import Optional

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


# From this embedding dimension on (taming's D=256) the distances come from matmuls: the
# direct form materialises [..., K, D] (D=256, K=16384: 17 GB for 1024 positions), the
# expansion sum w e^2 - 2 sum w e mu + sum w mu^2 (w = 1/sigma^2) only [..., K]. Centred
# at the codebook's mean, it agrees with the direct form within 1e-5 bits (measured:
# D=256, K=16384, entries clustered 50 sigma from the origin: 6e-6 bits; uncentred 1.2).
MATMUL_MIN_DIM = 32


def _neg_half_mahalanobis(mu, sigma, codebook):
  """-1/2 sum_d ((e_kd - mu_d) / sigma_d)^2: [..., D] x [K, D] -> [..., K]."""
  if codebook.shape[-1] < MATMUL_MIN_DIM:
    diff = (codebook - mu[..., None, :]) / sigma[..., None, :]
    return -0.5 * jnp.sum(diff * diff, axis=-1)
  centre = jnp.mean(codebook, axis=0)
  e, m = codebook - centre, mu - centre
  w = 1.0 / (sigma * sigma)
  hi = jax.lax.Precision.HIGHEST
  ee = jnp.einsum("...d,kd->...k", w, e * e, precision=hi)
  em = jnp.einsum("...d,kd->...k", w * m, e, precision=hi)
  return -0.5 * (ee - 2.0 * em + jnp.sum(w * m * m, axis=-1, keepdims=True))


def index_log_probs(mu: jax.Array, sigma: jax.Array, codebook: jax.Array,
                    log_prior: Optional[jax.Array] = None,
                    mix_logit: Optional[jax.Array] = None) -> jax.Array:
  """Natural-log probabilities of every index: mu, sigma [..., D], codebook [K, D] -> [..., K]."""
  mu, sigma, codebook = (a.astype(jnp.float32) for a in (mu, sigma, codebook))
  logits = _neg_half_mahalanobis(mu, sigma, codebook)
  if log_prior is not None:
    logits = logits + log_prior.astype(jnp.float32)
  lp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  if mix_logit is not None:
    b = jnp.zeros(codebook.shape[:1]) if log_prior is None else log_prior.astype(jnp.float32)
    m = jnp.asarray(mix_logit, jnp.float32)
    lp = jnp.logaddexp(jax.nn.log_sigmoid(-m) + lp,
                       jax.nn.log_sigmoid(m) + b - jax.nn.logsumexp(b))
  return lp


def encoder_pull(entry: jax.Array, y: jax.Array, scale=1.0) -> jax.Array:
  """entry + (y - stop_gradient(y)) * scale: forward value e_k*, the codebook's exact
  gradient through `entry`, and, on top of it, a straight-through pull of the encoder's y.

  The codebook must receive the exact gradient of the bits it is priced at (docs/method.md):
  for the chosen entry (1 - p_k)(e_k - mu) / (sigma^2 ln 2), a pull toward mu. Putting the
  straight-through vector `y + stop_gradient(e_k - y)` in the chosen entry's distance would
  cut that entry's own term and leave only -p_k (e_k - mu) / (sigma^2 ln 2) from the
  normaliser, a push away from mu.
  The encoder's pull is our choice (config `model.rate_straight_through`): 'exact' gives
  y the chosen term's gradient (e_k - mu) / (sigma^2 ln 2); 'scaled' multiplies it by
  stop_gradient(sigma^2), a bounded (e_k - mu) / ln 2 (the unscaled pull drove y away
  from the codebook in training: VQ loss 1e4 within 200 steps of the tiny config); 'off'
  gives y nothing.
  """
  return entry + (y - jax.lax.stop_gradient(y)) * scale


def _bits_flat(mu, sigma, chosen, chosen_prior, codebook, log_prior, mix_logit=None):
  logits = _neg_half_mahalanobis(mu, sigma, codebook) + log_prior
  d = (chosen - mu) / sigma
  lp = chosen_prior - 0.5 * jnp.sum(d * d, axis=-1) - jax.nn.logsumexp(logits, axis=-1)
  if mix_logit is not None:
    lp = jnp.logaddexp(jax.nn.log_sigmoid(-mix_logit) + lp,
                       jax.nn.log_sigmoid(mix_logit) + chosen_prior - jax.nn.logsumexp(log_prior))
  return -lp / LN2


def _scoped(fn):
  """Run under jax.named_scope('rate_softmax'): profiles attribute its ops to the rate model."""
  import functools

  @functools.wraps(fn)
  def wrapped(*a, **k):
    with jax.named_scope("rate_softmax"):
      return fn(*a, **k)
  return wrapped


@_scoped
def index_bits(mu: jax.Array, sigma: jax.Array, codebook: jax.Array, indices: jax.Array,
               y: Optional[jax.Array] = None,
               chunk_size: Optional[int] = None, straight_through_mode: str = "exact",
               log_prior: Optional[jax.Array] = None,
               mix_logit: Optional[jax.Array] = None) -> jax.Array:
  """-log2 p(indices | mu, sigma): mu, sigma [..., D], indices [...] -> bits [...] (f32).

  The codebook always receives the exact gradient of these bits. With `y` (the encoder's
  continuous vector, [..., D]) the chosen entry also pulls y (`encoder_pull`, mode
  'exact' or 'scaled'; 'off' or y=None: no gradient into the encoder).
  With `chunk_size`, positions are priced `chunk_size` at a time, rematerialised in the
  backward pass, so peak memory is [chunk_size, K] rather than [positions, K].
  """
  codebook = codebook.astype(jnp.float32)
  batch_shape = indices.shape
  dim = codebook.shape[-1]
  log_prior = (jnp.zeros(codebook.shape[:1], jnp.float32) if log_prior is None
               else log_prior.astype(jnp.float32))
  chosen = jnp.take(codebook, indices, axis=0)       # carries the codebook's gradient
  chosen_prior = jnp.take(log_prior, indices, axis=0).reshape(-1)
  if y is not None and straight_through_mode != "off":
    if straight_through_mode == "exact":
      scale = 1.0
    elif straight_through_mode == "scaled":
      scale = jax.lax.stop_gradient(jnp.square(sigma.astype(jnp.float32)))
    else:
      raise ValueError(f"straight_through_mode must be 'exact', 'scaled' or 'off', "
                       f"got {straight_through_mode!r}")
    chosen = encoder_pull(chosen, y.astype(jnp.float32), scale)
  lead = batch_shape[0] if batch_shape else 1
  mu = mu.astype(jnp.float32).reshape(lead, -1, dim)
  sigma = sigma.astype(jnp.float32).reshape(lead, -1, dim)
  chosen = chosen.reshape(lead, -1, dim)
  chosen_prior = chosen_prior.reshape(lead, -1)
  p = mu.shape[1]
  if mix_logit is not None:
    mix_logit = jnp.asarray(mix_logit, jnp.float32)
  if chunk_size is None or p <= chunk_size:
    bits = _bits_flat(mu, sigma, chosen, chosen_prior, codebook, log_prior, mix_logit)
  else:
    n = -(-p // chunk_size)
    pad = n * chunk_size - p
    def split(a, fill):   # [lead, p, ...] -> [n, lead, chunk, ...]
      a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
      return jnp.moveaxis(a.reshape((lead, n, chunk_size) + a.shape[2:]), 1, 0)
    fn = jax.checkpoint(lambda a: _bits_flat(a[0], a[1], a[2], a[3], codebook, log_prior,
                                             mix_logit))
    bits = jax.lax.map(fn, (split(mu, 0.0), split(sigma, 1.0), split(chosen, 0.0),
                            split(chosen_prior, 0.0)))
    bits = jnp.moveaxis(bits, 0, 1).reshape(lead, n * chunk_size)[:, :p]
  return bits.reshape(batch_shape)


def static_bits(log_prior: jax.Array, indices: jax.Array) -> jax.Array:
  """Bits of each index under the static distribution softmax(log_prior): [...] f32.

  The hyperprior-off ablation (Control-GIC's static code, learned end to end)."""
  lp = log_prior.astype(jnp.float32) - jax.nn.logsumexp(log_prior.astype(jnp.float32))
  return -jnp.take(lp, indices, axis=0) / LN2
