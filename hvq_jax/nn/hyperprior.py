"""One hyperprior branch per granularity (Ballé 2018, predicting mean and scale).

z = H_a(y) (strided convs), z_hat = round(z) (uniform noise when training), priced
by the factorized entropy bottleneck; (mu, sigma) = H_s(z_hat) in the D-dimensional
embedding space, cropped back to y's grid.

Our choice (config `hyperprior.mask_z`): a z position is sent only when its 2^n x 2^n
block of y holds a position sent at this granularity; the rest are set to 0 on both sides
(the decoder knows the granularity map before z). Without it every branch pays for z over
the whole image although the map sends each granularity on a fraction of it.

Our choice (config `hyperprior.context`, 'coarser'): H_s also reads what the decoder
already has on y's grid when this granularity's indices come (the map, the coarser
granularities' entries: `HVQ.prior_context`), mean-pooled onto z's grid next to z_hat and,
through two 3x3 convs, added before the last layer. Measured on the tiny model's plug-in
prior: results/FINDINGS.md "Making the hyperprior pay".

Our choice (config `hyperprior.spatial`, 'checkerboard' | 'quad'): a granularity's indices
are coded in interleaved passes (`layout.pass_map`). Pass 0 is priced as above; pass p > 0
also reads the entries of this granularity decoded in passes < p and their mask
(`layout.spatial_context`), through two 3x3 convs (one set for every pass: the mask says
which neighbours are known) added before the last layer. Neighbouring codes of a photo
are far from independent, and z (one vector per 8x8 block here) cannot say which of them
sits where; the decoder has the earlier passes' entries before a pass's indices come.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from hvq_jax.entropy.bottleneck import EntropyBottleneck


class HyperBranch(nn.Module):
  embed_dim: int
  channels: int
  latent_channels: int
  num_down: int
  sigma_min: float
  sigma_max: float
  dtype: Any = jnp.float32
  codebook_size: int = 0      # > 0: learn a static logit per codebook entry (rate.py)
  bias_scale: float = 1.0     # logits = bias_scale * param: Adam's step per logit x this
  mixture: bool = False       # mix the PMF with the static histogram (rate.py)
  context_channels: int = 0   # > 0: H_s also reads a context map on y's grid (trial)
  spatial: bool = False       # H_s's last layer also reads earlier passes' entries

  def setup(self):
    c = self.channels
    self.a_in = nn.Conv(c, (3, 3), dtype=self.dtype, name="analysis_in")
    self.a_down = [nn.Conv(c if i < self.num_down - 1 else self.latent_channels, (5, 5),
                           strides=(2, 2), dtype=self.dtype, name=f"analysis_down{i}")
                   for i in range(self.num_down)]
    self.s_up = [nn.ConvTranspose(c, (5, 5), strides=(2, 2), dtype=self.dtype,
                                  name=f"synthesis_up{i}") for i in range(self.num_down)]
    self.s_out = nn.Conv(2 * self.embed_dim, (3, 3), dtype=self.dtype, name="synthesis_out")
    if self.context_channels:
      self.c_in = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="context_in")
      self.c_full = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="context_full")
    if self.spatial:
      self.sp_in = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="spatial_context_in")
      self.sp_full = nn.Conv(self.channels, (3, 3), dtype=self.dtype,
                             name="spatial_context_full")
    self.bottleneck = EntropyBottleneck(self.latent_channels, name="bottleneck")
    if self.codebook_size:
      # Adam moves a parameter by ~lr per step; log-frequencies of codes span ~10 nats,
      # so the logit is a scaled parameter to be learnable within a training run.
      self.index_bias = self.param("index_bias", nn.initializers.zeros, (self.codebook_size,))
    if self.mixture:
      self.mix_logit = self.param("mix_logit", nn.initializers.constant(-2.0), ())

  def log_prior(self):
    """The per-entry static logits [K] f32, or None when the branch has none."""
    return self.bias_scale * self.index_bias.astype(jnp.float32) if self.codebook_size else None

  def mixture_logit(self):
    """logit of the static histogram's weight in the index PMF, or None."""
    return self.mix_logit.astype(jnp.float32) if self.mixture else None

  def analysis(self, y: jax.Array) -> jax.Array:
    """y [B, h, w, D] -> z [B, ceil(h / 2^n), ceil(w / 2^n), C_z] float32."""
    h = nn.gelu(self.a_in(y.astype(self.dtype)))
    for i, layer in enumerate(self.a_down):
      h = layer(h)
      if i < self.num_down - 1:
        h = nn.gelu(h)
    return h.astype(jnp.float32)

  def features(self, z_hat: jax.Array, grid_hw, ctx=None) -> jax.Array:
    """z_hat (and the coarser context `ctx` [B, h, w, C_ctx] on y's grid, pooled to z's
    grid and added at both ends) -> what the last layer reads [B, ., ., channels]: on y's
    grid `grid_hw` with a context or a spatial context, else on z's grid upsampled (the
    last layer sees past y's border there, and its output is cropped)."""
    h = z_hat.astype(self.dtype)
    if ctx is not None:
      f = 2 ** self.num_down
      hz, wz = z_hat.shape[1:3]
      c = jnp.pad(ctx, ((0, 0), (0, hz * f - ctx.shape[1]), (0, wz * f - ctx.shape[2]), (0, 0)))
      c = c.reshape(c.shape[0], hz, f, wz, f, c.shape[-1]).mean(axis=(2, 4))
      h = jnp.concatenate([h, c.astype(self.dtype)], axis=-1)
    for layer in self.s_up:
      h = nn.gelu(layer(h))
    if ctx is not None or self.spatial:   # the contexts live on y's grid: crop first
      h = h[:, :grid_hw[0], :grid_hw[1]]
    if ctx is not None:
      h = h + self.c_full(nn.gelu(self.c_in(ctx.astype(self.dtype))))
    return h

  def head(self, h: jax.Array, grid_hw, spatial=None) -> tuple:
    """`features` (+ the spatial context's convs of `spatial` [B, h, w, D + 1], one
    pass's `layout.spatial_context`) -> (mu, sigma) [B, h, w, D] f32 on y's grid."""
    if spatial is not None:
      h = h + self.sp_full(nn.gelu(self.sp_in(spatial.astype(self.dtype))))
    out = self.s_out(h).astype(jnp.float32)[:, :grid_hw[0], :grid_hw[1]]
    mu, log_sigma = jnp.split(out, 2, axis=-1)
    log_sigma = jnp.clip(log_sigma, math.log(self.sigma_min), math.log(self.sigma_max))
    return mu, jnp.exp(log_sigma)

  def synthesis(self, z_hat: jax.Array, grid_hw, ctx=None, spatial=None) -> tuple:
    """z_hat -> (mu, sigma), each [B, h, w, D] float32 on y's grid `grid_hw`.
    `ctx` [B, h, w, C_ctx]: what the decoder already knows on y's grid (the coarser
    granularities' decoded entries and the map). `spatial` (hyperprior.spatial):
    (pass of each position int [h, w], the earlier passes' entries [P - 1, B, h, w, D + 1]
    for passes 1..P-1): every position gets the prior of its own pass, which is what the
    coder codes it with (pass 0 reads no spatial context)."""
    h = self.features(z_hat, grid_hw, ctx)
    if spatial is None:
      return self.head(h, grid_hw)
    passes, maps = spatial
    mu, sigma = self.head(h, grid_hw)
    for p in range(1, maps.shape[0] + 1):
      mu_p, sigma_p = self.head(h, grid_hw, maps[p - 1])
      here = (passes == p)[None, :, :, None]
      mu, sigma = jnp.where(here, mu_p, mu), jnp.where(here, sigma_p, sigma)
    return mu, sigma

  def __call__(self, y: jax.Array, training: bool, z_mask=None, ctx=None, spatial=None) -> dict:
    """`z_mask` [B, h_z, w_z] bool: z positions that are sent; the others are 0 on both
    sides of the codec and cost nothing. `ctx`, `spatial`: as `synthesis`."""
    z = self.analysis(y)
    z_hat, z_bits = self.bottleneck(z, training)
    if z_mask is not None:
      m = z_mask[..., None].astype(z_hat.dtype)
      z_hat, z_bits = z_hat * m, z_bits * m
    mu, sigma = self.synthesis(z_hat, y.shape[1:3], ctx, spatial)
    return dict(z=z, z_hat=z_hat, z_bits=z_bits, mu=mu, sigma=sigma)


class StaticIndexPrior(nn.Module):
  """The hyperprior-off ablation: one learned histogram (logits) of indices, no z."""
  codebook_size: int
  bias_scale: float = 1.0

  def setup(self):
    self.index_bias = self.param("index_bias", nn.initializers.zeros, (self.codebook_size,))

  def log_prior(self):
    return self.bias_scale * self.index_bias.astype(jnp.float32)

  def mixture_logit(self):
    return None
