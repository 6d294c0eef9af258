"""PatchGAN discriminator (pix2pix / taming NLayerDiscriminator), NHWC.

Our choice: GroupNorm instead of BatchNorm, so the discriminator is stateless and
sharding-agnostic (no cross-device batch statistics).
"""
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn


class PatchGAN(nn.Module):
  ch: int = 64
  n_layers: int = 2
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, 3] in [-1, 1] -> patch logits [B, h, w, 1] float32."""
    pad = ((1, 1), (1, 1))
    h = nn.Conv(self.ch, (4, 4), strides=(2, 2), padding=pad, dtype=self.dtype)(x.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    mult = 1
    for n in range(1, self.n_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      h = nn.Conv(self.ch * mult, (4, 4), strides=(stride, stride), padding=pad,
                  use_bias=False, dtype=self.dtype)(h)
      h = nn.GroupNorm(num_groups=min(self.groups, self.ch * mult), epsilon=1e-6,
                       dtype=self.dtype)(h)
      h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (4, 4), padding=pad, dtype=self.dtype)(h).astype(jnp.float32)
