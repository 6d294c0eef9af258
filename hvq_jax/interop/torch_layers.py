"""PyTorch layers mirroring `hvq_jax.nn.layers` numerically: flax 'SAME' padding (asymmetric
when the stride is 2), VQGAN's pad-then-VALID downsampling, GroupNorm eps 1e-6, PyTorch-style
nearest resizing, chunked attention and `lax.conv_transpose` as a forward conv on the
zero-dilated input. Parameter names are the export's keys. Needs the `torch` extra.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _same_pads(n: int, k: int, s: int):
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


class Conv(nn.Module):
  """flax nn.Conv: weight OIHW, 'SAME' (possibly asymmetric) or 'VALID' padding."""

  def __init__(self, cin, cout, k, stride=1, padding="SAME"):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(cout, cin, k, k))
    self.bias = nn.Parameter(torch.zeros(cout))
    self.k, self.stride, self.padding = k, stride, padding

  def forward(self, x):
    if self.padding == "SAME":
      ph = _same_pads(x.shape[2], self.k, self.stride)
      pw = _same_pads(x.shape[3], self.k, self.stride)
      x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
    return F.conv2d(x, self.weight, self.bias, stride=self.stride)


class ConvTransposeSame(nn.Module):
  """flax nn.ConvTranspose(stride 2, 'SAME'): lax.conv_transpose = a forward conv with
  this OIHW kernel over the input dilated by the stride and padded (pad_a, pad_b)."""

  def __init__(self, cin, cout, k, stride=2):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(cout, cin, k, k))
    self.bias = nn.Parameter(torch.zeros(cout))
    self.k, self.s = k, stride
    pad_len = k + stride - 2
    self.pad_a = k - 1 if stride > k - 1 else math.ceil(pad_len / 2)
    self.pad_b = pad_len - self.pad_a

  def forward(self, x):
    b, c, h, w = x.shape
    d = x.new_zeros(b, c, (h - 1) * self.s + 1, (w - 1) * self.s + 1)
    d[:, :, ::self.s, ::self.s] = x
    d = F.pad(d, (self.pad_a, self.pad_b, self.pad_a, self.pad_b))
    return F.conv2d(d, self.weight, self.bias)


class Dense(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(cout, cin))
    self.bias = nn.Parameter(torch.zeros(cout))

  def forward(self, x):
    return F.linear(x, self.weight, self.bias)


class GroupNorm(nn.GroupNorm):
  def __init__(self, groups, ch):
    super().__init__(groups, ch, eps=1e-6)


def nearest_resize(x, size):
  h_in, w_in = x.shape[2:]
  if (h_in, w_in) == tuple(size):
    return x
  rows = (torch.arange(size[0]) * h_in) // size[0]
  cols = (torch.arange(size[1]) * w_in) // size[1]
  return x[:, :, rows][:, :, :, cols]


class SpatialNorm(nn.Module):
  def __init__(self, groups, ch, cond_ch):
    super().__init__()
    self.norm = GroupNorm(groups, ch)
    self.conv_y = Conv(cond_ch, ch, 1)
    self.conv_b = Conv(cond_ch, ch, 1)

  def forward(self, h, cond):
    c = nearest_resize(cond, h.shape[2:])
    return self.norm(h) * self.conv_y(c) + self.conv_b(c)


def _norm(groups, ch, cond_ch):
  return GroupNorm(groups, ch) if cond_ch is None else SpatialNorm(groups, ch, cond_ch)


class ResBlock(nn.Module):
  def __init__(self, cin, cout, groups, cond_ch=None):
    super().__init__()
    self.norm1 = _norm(groups, cin, cond_ch)
    self.conv1 = Conv(cin, cout, 3)
    self.norm2 = _norm(groups, cout, cond_ch)
    self.conv2 = Conv(cout, cout, 3)
    self.nin_shortcut = Conv(cin, cout, 1) if cin != cout else None
    self.cond = cond_ch is not None

  def forward(self, x, cond=None):
    n = (lambda m, h: m(h, cond)) if self.cond else (lambda m, h: m(h))
    h = self.conv1(F.silu(n(self.norm1, x)))
    h = self.conv2(F.silu(n(self.norm2, h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


def attention(q, k, v, chunk: int = 1024):
  """softmax(q k^T / sqrt(C)) v over [B, T, C] tokens, `chunk` queries at a time (the JAX
  `layers.attention`): a [chunk, T] score block at once, so memory is linear in T."""
  root = math.sqrt(q.shape[-1])
  step = q.shape[1] if chunk <= 0 else chunk
  kt = k.transpose(1, 2)
  return torch.cat([torch.softmax(q[:, s:s + step] @ kt / root, dim=-1) @ v
                    for s in range(0, q.shape[1], step)], dim=1)


class AttnBlock(nn.Module):
  def __init__(self, ch, groups, cond_ch=None, chunk=1024):
    super().__init__()
    self.norm = _norm(groups, ch, cond_ch)
    self.q, self.k, self.v, self.proj_out = (Conv(ch, ch, 1) for _ in range(4))
    self.cond = cond_ch is not None
    self.chunk = chunk

  def forward(self, x, cond=None):
    b, c, h, w = x.shape
    hn = self.norm(x, cond) if self.cond else self.norm(x)
    q, k, v = (m(hn).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
    out = attention(q, k, v, self.chunk).transpose(1, 2).reshape(b, c, h, w)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  def __init__(self, ch):
    super().__init__()
    self.conv = Conv(ch, ch, 3, stride=2, padding="VALID")

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, ch):
    super().__init__()
    self.conv = Conv(ch, ch, 3)

  def forward(self, x):
    return self.conv(x.repeat_interleave(2, 2).repeat_interleave(2, 3))


class LambdaFiLM(nn.Module):
  def __init__(self, ch):
    super().__init__()
    self.embed = Dense(1, 64)
    self.scale_shift = Dense(64, 2 * ch)

  def forward(self, h, log_lmbda):
    ss = self.scale_shift(F.silu(self.embed(log_lmbda[:, None])))
    scale, shift = ss[:, :, None, None].chunk(2, dim=1)
    return h * (1 + scale) + shift
