"""How large an image a model can code here: peak memory from the config, the budget, the
largest size that fits, and the refusal that names them (before any work is done)."""
import os
from typing import List, Optional, Tuple

import numpy as np
import jax

from hvq_jax import images as images_lib
from hvq_jax import layout

_F32 = 4   # attention scores are float32 whatever the compute dtype (jax.nn.dot_product_attention)


def _levels(ch: int, mult) -> List[Tuple[int, int]]:
  """(stride, channels) of each resolution level of a VQGAN encoder or decoder."""
  return [(2 ** i, ch * m) for i, m in enumerate(mult)]


def _attention(hp: int, wp: int, where: str, strides) -> List[Tuple[str, int, int, int]]:
  return [(where, s, (hp // s) * (wp // s), 2 * _F32 * ((hp // s) * (wp // s)) ** 2)
          for s in sorted(set(strides))]


def memory_estimate(model_cfg, hp: int, wp: int) -> dict:
  """Peak bytes to encode and to decode one padded hp x wp image, from the config alone.

  - attention: every attention block builds a float32 [T, T] score matrix and its softmax
    (T = tokens at its stride): 2 * 4 * T^2 bytes, the term that grows with the square of
    the pixel count (the decoder always attends globally at its top stride).
  - activations: encoder, 4 maps of its widest level; decoder, every level's spatially
    conditioned norms (2 maps each, which XLA computes from the code map ahead of time)
    and 4 working maps, all levels at once. Calibrated against XLA's own memory analysis
    on CPU (tests/test_images.py): 1.1x to 1.9x above it for the default, tiny and test
    configs, never below. XLA on an H100 needs 3-5x less for the decoder; there the
    encoder's attention decides (default config: 2048x2048 ran out of memory asking 32 GiB
    for it, estimate 45 GB; 1536x2048 peaked at 20 GB, estimate 27 GB to encode, 50 to decode).
  - entropy: float32 index weights of every position (K per position; the encoder keeps
    every branch's until range coding, the decoder one stream's).

  Returns {"encode": bytes, "decode": bytes, "attention": the largest attention block
  (network, stride, tokens, bytes) or None}.
  """
  c = model_cfg
  px = lambda s: (hp // s) * (wp // s)
  enc_levels = _levels(c.ch, c.ch_mult)
  enc_strides = {s for s, _ in enc_levels}
  enc_attn = _attention(hp, wp, "encoder", [s for s in c.attn_strides if s in enc_strides]
                        + [s for s in c.strides if s in c.head_attn_strides])
  enc_act = max(4 * ch * px(s) * _F32 for s, ch in enc_levels)
  dec_levels = _levels(c.dec_ch, c.dec_ch_mult)
  top = dec_levels[-1][0]
  dec_attn_at = [s for s, _ in dec_levels if s in c.dec_attn_strides]
  dec_attn = _attention(hp, wp, "decoder", [top] + dec_attn_at)
  blocks = c.dec_num_res_blocks + 1
  dec_act = 0
  for s, ch in dec_levels:
    norms = 2 * blocks + (blocks if s in dec_attn_at else 0)
    norms += (1 if s == 1 else 0) + (5 if s == top else 0)   # norm_out; mid res-attn-res
    dec_act += (2 * norms + 4) * ch * px(s) * _F32
  positions = px(min(c.strides))
  weights = positions * int(c.codebook_size) * _F32
  stages = int(c.rvq_stages)
  worst = max(enc_attn + dec_attn, key=lambda a: a[3], default=None)
  return dict(encode=max(enc_act + sum(a[3] for a in enc_attn), stages * 3 * weights),
              decode=dec_act + sum(a[3] for a in dec_attn) + weights,
              attention=worst)


def memory_budget(model) -> Tuple[float, str]:
  """(bytes one image may take, where that figure comes from): `codec.memory_budget_gb`,
  or with 0 there, 75% of the default device's memory (physical memory on a CPU)."""
  gb = float(model.codec["memory_budget_gb"])
  if gb > 0:
    return gb * 1e9, "config.codec.memory_budget_gb"
  dev = jax.devices()[0]
  total = None
  try:
    total = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:   # backends without memory stats
    total = None
  if not total:
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      total = 16e9
  return 0.75 * float(total), (f"75% of this {dev.platform} device's {total / 1e9:.1f} GB; "
                               "set config.codec.memory_budget_gb to change it")


def _fits(model, h: int, w: int, budget: float, decode_only: bool) -> bool:
  hp, wp = layout.padded_size(h, w, model.cfg.strides[0])
  m = memory_estimate(model.cfg, hp, wp)
  return (m["decode"] if decode_only else max(m["encode"], m["decode"])) <= budget


def largest_size(model, aspect: float = 1.0, decode_only: bool = False,
                 budget: Optional[float] = None) -> Tuple[int, int]:
  """The largest (h, w) with h / w ~ `aspect` that this model can code within the budget
  (also within `codec.max_pixels`); (0, 0) when not even one coarse patch fits."""
  budget = memory_budget(model)[0] if budget is None else budget
  limit = int(model.codec["max_pixels"])
  size = lambda k: (max(1, int(k * np.sqrt(aspect))), max(1, int(k / np.sqrt(aspect))))
  ok = lambda k: (size(k)[0] * size(k)[1] <= limit
                  and _fits(model, *size(k), budget, decode_only))
  if not ok(1):
    return 0, 0
  lo, hi = 1, 2
  while ok(hi):
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid)
  return size(lo)


def check_size(model, h: int, w: int, error=images_lib.ImageError,
               decode_only: bool = False) -> None:
  """Raise `error` naming the need, the budget and the largest codable size when an h x w
  image would not fit this device (decode_only: a file to decode)."""
  budget, source = memory_budget(model)
  if _fits(model, h, w, budget, decode_only):
    return
  hp, wp = layout.padded_size(h, w, model.cfg.strides[0])
  m = memory_estimate(model.cfg, hp, wp)
  need = m["decode"] if decode_only else max(m["encode"], m["decode"])
  why = ""
  if m["attention"] is not None:
    net, s, t, b = m["attention"]
    why = (f"; its {net}'s global attention at stride {s} spans {t:,} tokens, "
           f"{b / 2e9:.3g} GB per float32 score matrix")
  lh, lw = largest_size(model, h / w, decode_only, budget)
  sq = largest_size(model, 1.0, decode_only, budget)
  what = "decoding a" if decode_only else "coding a"
  raise error(f"{what} {h}x{w} image needs about {need / 1e9:.3g} GB with this model{why}; "
              f"the budget is {budget / 1e9:.3g} GB ({source}). The largest image this model "
              f"can {'decode' if decode_only else 'code'} here is about {lh}x{lw} at this "
              f"aspect ratio ({sq[0]}x{sq[1]} square): downscale or tile it")
