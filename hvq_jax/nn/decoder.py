"""Decoder: one VQGAN decoder conditioned on the merged multi-granularity code map.

Our choice (METHOD.md leaves it open): Control-GIC has one stem per granularity and
mixes masks at strides 8 and 4. We merge first: every fine-grid position gets the
embedding of the code that covers it plus a one-hot of its granularity, and that map
conditions every norm of a MoVQ decoder (spatial norms) from the coarse stride up.
Attention only at the lowest resolution (`attn_strides`), so decoding a 768x512 image
never builds a 24,576-token attention matrix.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from hvq_jax.nn import layers


class Decoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_strides: Sequence[int]
  groups: int
  out_channels: int = 3
  dtype: Any = jnp.float32
  remat: bool = False             # recompute ResBlock activations in the backward pass
  attn_chunk: int = 1024          # attention queries at once (layers.attention)
  mid_attn: bool = True           # the middle block's global attention

  @nn.compact
  def __call__(self, cond: jax.Array, out_hw) -> jax.Array:
    """cond: [B, h_f, w_f, D+3] merged code map at the fine stride.

    Returns [B, H, W, 3] float32 with H, W = out_hw (the padded image size).
    """
    block = nn.remat(layers.ResBlock) if self.remat else layers.ResBlock
    levels = len(self.ch_mult)
    top = 2 ** (levels - 1)
    H, W = out_hw
    cond = cond.astype(self.dtype)
    h = layers.nearest_resize(cond, (H // top, W // top))
    h = layers.conv(self.ch * self.ch_mult[-1], 3, self.dtype, name="conv_in")(h)
    h = layers.ResBlock(h.shape[-1], self.groups, self.dtype, name="mid_res1")(h, cond)
    if self.mid_attn:
      h = layers.AttnBlock(self.groups, self.dtype, self.attn_chunk, name="mid_attn")(h, cond)
    h = layers.ResBlock(h.shape[-1], self.groups, self.dtype, name="mid_res2")(h, cond)
    for level in reversed(range(levels)):
      stride = 2 ** level
      for i in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[level], self.groups, self.dtype,
                  name=f"up{level}_res{i}")(h, cond)
        if stride in self.attn_strides:
          h = layers.AttnBlock(self.groups, self.dtype, self.attn_chunk,
                               name=f"up{level}_attn{i}")(h, cond)
      if level != 0:
        h = layers.Upsample(self.dtype, name=f"up{level}_upsample")(h)
    h = nn.swish(layers.SpatialNorm(self.groups, self.dtype, name="norm_out")(h, cond))
    # The adaptive GAN weight needs the last layer's input (see train.py).
    self.sow("intermediates", "pre_out", h)
    h = layers.conv(self.out_channels, 3, self.dtype, name="conv_out")(h)
    return h.astype(jnp.float32)
