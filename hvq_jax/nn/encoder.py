"""VQGAN encoder with three heads: continuous features y_g per granularity.

Levels sit at strides 1, 2, 4, ... 2^(L-1). Head g reads the level whose stride is
`strides[g]` (coarse, medium, fine), as in Control-GIC.
"""
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from hvq_jax.nn import layers

from hvq_jax.layout import GRANULARITIES


class Head(nn.Module):
  """ResBlock-(Attn)-ResBlock, GroupNorm-swish, lambda FiLM, conv3x3 to D."""
  features: int
  embed_dim: int
  groups: int
  attention: bool
  lambda_conditioning: bool
  dtype: Any = jnp.float32
  attn_chunk: int = 1024

  @nn.compact
  def __call__(self, h, log_lmbda):
    h = layers.ResBlock(self.features, self.groups, self.dtype, name="res1")(h)
    if self.attention:
      h = layers.AttnBlock(self.groups, self.dtype, self.attn_chunk, name="attn")(h)
    h = layers.ResBlock(self.features, self.groups, self.dtype, name="res2")(h)
    h = nn.swish(layers.group_norm(self.groups, self.dtype, name="norm_out")(h))
    if self.lambda_conditioning:
      h = layers.LambdaFiLM(self.features, self.dtype, name="film")(h, log_lmbda)
    return layers.conv(self.embed_dim, 3, self.dtype, name="conv_out")(h)


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_strides: Sequence[int]
  head_attn_strides: Sequence[int]
  strides: Sequence[int]          # (coarse, medium, fine)
  embed_dim: int
  groups: int
  lambda_conditioning: bool
  dtype: Any = jnp.float32
  remat: bool = False             # recompute ResBlock activations in the backward pass
  attn_chunk: int = 1024          # attention queries at once (layers.attention)

  @nn.compact
  def __call__(self, x: jax.Array, log_lmbda: jax.Array) -> Dict[str, jax.Array]:
    """x: [B, H, W, 3] in [-1, 1], H and W multiples of the coarse stride.

    Returns {g: [B, H/s_g, W/s_g, D] float32}.
    """
    block = nn.remat(layers.ResBlock) if self.remat else layers.ResBlock
    h = layers.conv(self.ch, 3, self.dtype, name="conv_in")(x.astype(self.dtype))
    feats = {}
    for level, mult in enumerate(self.ch_mult):
      stride = 2 ** level
      for i in range(self.num_res_blocks):
        h = block(self.ch * mult, self.groups, self.dtype, name=f"down{level}_res{i}")(h)
        if stride in self.attn_strides:
          h = layers.AttnBlock(self.groups, self.dtype, self.attn_chunk,
                               name=f"down{level}_attn{i}")(h)
      feats[stride] = h
      if level != len(self.ch_mult) - 1:
        h = layers.Downsample(self.dtype, name=f"down{level}_downsample")(h)
    out = {}
    for g, s in zip(GRANULARITIES, self.strides):
      head = Head(feats[s].shape[-1], self.embed_dim, self.groups,
                  attention=s in self.head_attn_strides,
                  lambda_conditioning=self.lambda_conditioning, dtype=self.dtype,
                  attn_chunk=self.attn_chunk,
                  name=f"head_{g}")
      out[g] = head(feats[s], log_lmbda).astype(jnp.float32)
    return out
