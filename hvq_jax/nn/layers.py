"""VQGAN building blocks (NHWC): GroupNorm+swish ResBlocks, attention, resampling.

GroupNorm uses epsilon 1e-6 and the two-pass variance so numerics match PyTorch's
`nn.GroupNorm` (export parity). Every block takes `dtype` (compute) and keeps f32 params.
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


def group_norm(groups: int, dtype: Dtype, name: Optional[str] = None) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                      dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, stride: int = 1,
         padding: Any = "SAME", name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=padding, dtype=dtype, name=name)


class SpatialNorm(nn.Module):
  """MoVQ spatial normalisation: GroupNorm(h) * conv1x1(c) + conv1x1(c).

  `cond` is resized to h's grid by nearest neighbour (PyTorch's floor(i*in/out) rule),
  so a code covers exactly the pixels it stands for.
  """
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, cond: jax.Array) -> jax.Array:
    # The barrier makes this norm's convs of the code map wait for h: otherwise XLA runs
    # every norm's at the start (they depend on the code map alone) and keeps them all.
    h, c = jax.lax.optimization_barrier((h, cond.astype(self.dtype)))
    f = h.shape[-1]
    hn = group_norm(self.groups, self.dtype, name="norm")(h)
    # A 1x1 conv is per pixel, so it commutes with nearest resizing: it runs on the
    # smaller of the two grids, and a scale and shift upsampled to h's grid fuse into the
    # norm instead of being two [H, W, C] maps.
    if h.shape[1] * h.shape[2] < c.shape[1] * c.shape[2]:
      c = nearest_resize(c, h.shape[1:3])
    y = nearest_resize(conv(f, 1, self.dtype, name="conv_y")(c), h.shape[1:3])
    b = nearest_resize(conv(f, 1, self.dtype, name="conv_b")(c), h.shape[1:3])
    return hn * y + b


def nearest_resize(x: jax.Array, size) -> jax.Array:
  """Nearest resize of NHWC `x` to `size` with PyTorch's source index floor(i*in/out)."""
  h_in, w_in = x.shape[1:3]
  h_out, w_out = size
  if (h_in, w_in) == (h_out, w_out):
    return x
  if h_out % h_in == 0 and w_out % w_in == 0:   # whole repeats: a broadcast XLA fuses
    rh, rw = h_out // h_in, w_out // w_in
    b, c = x.shape[0], x.shape[-1]
    x = jnp.broadcast_to(x[:, :, None, :, None], (b, h_in, rh, w_in, rw, c))
    return x.reshape(b, h_out, w_out, c)
  if h_in % h_out == 0 and w_in % w_out == 0:   # floor(i * in / out) = i * ratio
    return x[:, ::h_in // h_out, ::w_in // w_out]
  rows = (jnp.arange(h_out) * h_in) // h_out
  cols = (jnp.arange(w_out) * w_in) // w_out
  return x[:, rows][:, :, cols]


class ResBlock(nn.Module):
  """norm-swish-conv x2 with a 1x1 shortcut when channels change.

  With `cond` given, norms are MoVQ spatial norms conditioned on the code map.
  """
  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    def norm(name, h):
      if cond is None:
        return group_norm(self.groups, self.dtype, name=name)(h)
      return SpatialNorm(self.groups, self.dtype, name=name)(h, cond)

    h = nn.swish(norm("norm1", x))
    h = conv(self.features, 3, self.dtype, name="conv1")(h)
    h = nn.swish(norm("norm2", h))
    h = conv(self.features, 3, self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, self.dtype, name="nin_shortcut")(x)
    return x + h


def attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
  """Single-head softmax(q k^T / sqrt(C)) v over [B, T, C] tokens, `chunk` queries at a time.

  Each chunk of queries attends to every key with the plain formula, so a row's result is
  the one full attention gives (to float rounding); only a [chunk, T] score block exists
  at once, and the chunk body is rematerialised in the backward pass, so memory grows
  linearly with T at inference and in training. T <= chunk (or chunk 0) is one block.
  """
  b, t, c = q.shape
  plain = lambda qc: jax.nn.dot_product_attention(
      qc[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
  if chunk <= 0 or t <= chunk:
    return plain(q)
  n = -(-t // chunk)
  qs = jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0)))
  qs = qs.reshape(b, n, chunk, c).swapaxes(0, 1)
  out = jax.lax.map(jax.checkpoint(plain), qs)          # [n, B, chunk, C]
  return out.swapaxes(0, 1).reshape(b, n * chunk, c)[:, :t]


class AttnBlock(nn.Module):
  """Single-head spatial self-attention (VQGAN) over all H*W tokens.

  Global, so its compute is quadratic in tokens; its memory is linear (`attention`
  in query chunks of `chunk`).
  """
  groups: int
  dtype: Dtype = jnp.float32
  chunk: int = 1024

  @nn.compact
  def __call__(self, x: jax.Array, cond: Optional[jax.Array] = None) -> jax.Array:
    b, h, w, c = x.shape
    if cond is None:
      hn = group_norm(self.groups, self.dtype, name="norm")(x)
    else:
      hn = SpatialNorm(self.groups, self.dtype, name="norm")(x, cond)
    q = conv(c, 1, self.dtype, name="q")(hn).reshape(b, h * w, c)
    k = conv(c, 1, self.dtype, name="k")(hn).reshape(b, h * w, c)
    v = conv(c, 1, self.dtype, name="v")(hn).reshape(b, h * w, c)
    out = attention(q, k, v, self.chunk).reshape(b, h, w, c)
    return x + conv(c, 1, self.dtype, name="proj_out")(out)


class Downsample(nn.Module):
  """VQGAN downsampling: pad right/bottom by one, then a 3x3 stride-2 VALID conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, self.dtype, stride=2, padding="VALID", name="conv")(x)


class Upsample(nn.Module):
  """Nearest 2x upsampling then a 3x3 conv (VQGAN)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, self.dtype, name="conv")(x)


class LambdaFiLM(nn.Module):
  """Feature-wise scale/shift from log(lambda): one set of weights serves many rates.

  log(lambda) is a continuous input, so a target rate can be searched between the
  trained lambdas. Zero-initialised, so an unconditioned start is the identity.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, log_lmbda: jax.Array) -> jax.Array:
    e = nn.Dense(64, dtype=self.dtype, name="embed")(log_lmbda[:, None].astype(self.dtype))
    e = nn.swish(e)
    ss = nn.Dense(2 * self.features, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                  name="scale_shift")(e)
    scale, shift = jnp.split(ss[:, None, None, :], 2, axis=-1)
    return h * (1 + scale) + shift
