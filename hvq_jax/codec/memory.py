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


def _attention(hp: int, wp: int, where: str, strides, chunk: int) -> List[Tuple[str, int, int, int]]:
  """(network, stride, tokens, bytes) per attention stride: a [min(T, chunk), T] float32
  score block and its softmax (nn/layers.py attention), linear in T for a fixed chunk."""
  out = []
  for s in sorted(set(strides)):
    t = (hp // s) * (wp // s)
    rows = t if chunk <= 0 else min(t, chunk)
    out.append((where, s, t, 2 * _F32 * rows * t))
  return out


def memory_estimate(model_cfg, hp: int, wp: int) -> dict:
  """Peak bytes to encode and to decode one padded hp x wp image, from the config alone.

  Every term is linear in the pixel count (for a fixed `attn_chunk`), so the largest
  codable image grows in proportion to the memory budget.
  - attention: each block holds a [chunk, T] float32 score block and its softmax
    (T = tokens at its stride, chunk = min(T, `attn_chunk`)).
  - activations: encoder, 4 maps of its widest level; decoder, 4 maps at the level
    where they are largest (a level's width is its own or, where it is upsampled into,
    the coarser level's) and one map of each coarser level. The spatial norms' scales
    and shifts are computed on the code map's grid and fuse into the norms (nn/layers.py
    SpatialNorm), so they hold no full-size maps. Calibrated against XLA's own memory
    analysis on CPU (tests/test_images.py): 1.1x to 1.4x above it for the default, tiny
    and test configs, never below.
  - entropy: float32 index weights of every position (K per position; the encoder keeps
    every branch's until range coding, the decoder one stream's).

  Returns {"encode": bytes, "decode": bytes, "attention": the largest attention block
  (network, stride, tokens, bytes) or None}.
  """
  c = model_cfg
  chunk = int(c.attn_chunk)
  px = lambda s: (hp // s) * (wp // s)
  enc_levels = _levels(c.ch, c.ch_mult)
  enc_strides = {s for s, _ in enc_levels}
  enc_attn = _attention(hp, wp, "encoder", [s for s in c.attn_strides if s in enc_strides]
                        + [s for s in c.strides if s in c.head_attn_strides], chunk)
  enc_act = max(4 * ch * px(s) * _F32 for s, ch in enc_levels)
  dec_levels = _levels(c.dec_ch, c.dec_ch_mult)
  top = dec_levels[-1][0]
  dec_attn = _attention(hp, wp, "decoder",
                        [top] * bool(c.dec_mid_attn)
                        + [s for s, _ in dec_levels if s in c.dec_attn_strides], chunk)
  widths = [max(ch, dec_levels[i + 1][1] if i + 1 < len(dec_levels) else 0)
            for i, (_, ch) in enumerate(dec_levels)]
  dec_peak = [4 * w * px(s) * _F32 + sum(ch * px(t) * _F32 for t, ch in dec_levels[i + 1:])
              for i, ((s, _), w) in enumerate(zip(dec_levels, widths))]
  peak_at = int(np.argmax(dec_peak))
  dec_act = dec_peak[peak_at] + 3 * hp * wp * _F32   # + the float image before uint8
  positions = px(min(c.strides))
  weights = positions * int(c.codebook_size) * _F32
  stages = int(c.rvq_stages)
  worst = max(enc_attn + dec_attn, key=lambda a: a[3], default=None)
  attn_part = lambda a: (f"its {a[0]}'s global attention at stride {a[1]} over {a[2]:,} "
                         "tokens", a[3])
  enc_s, enc_ch = max(enc_levels, key=lambda l: l[1] * px(l[0]))
  enc_parts = [(f"its encoder's feature maps at stride {enc_s} ({enc_ch} channels)", enc_act),
               ("the index weights of every sent position", stages * 3 * weights)]
  dec_parts = [(f"its decoder's feature maps at stride {dec_levels[peak_at][0]} "
                f"({widths[peak_at]} channels)", dec_act),
               ("the index weights of a stream", weights)]
  return dict(encode=max(enc_act + sum(a[3] for a in enc_attn), stages * 3 * weights),
              decode=dec_act + sum(a[3] for a in dec_attn) + weights,
              attention=worst,
              largest=dict(encode=max(enc_parts + [attn_part(a) for a in enc_attn],
                                      key=lambda p: p[1]),
                           decode=max(dec_parts + [attn_part(a) for a in dec_attn],
                                      key=lambda p: p[1])))


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
  side = "decode" if decode_only else max(("encode", "decode"), key=lambda k: m[k])
  what, part = m["largest"][side]
  why = f"; the largest part is {what}, {part / 1e9:.3g} GB"
  lh, lw = largest_size(model, h / w, decode_only, budget)
  sq = largest_size(model, 1.0, decode_only, budget)
  verb = "decoding a" if decode_only else "coding a"
  raise error(f"{verb} {h}x{w} image needs about {need / 1e9:.3g} GB with this model{why}; "
              f"the budget is {budget / 1e9:.3g} GB ({source}). The largest image this model "
              f"can {'decode' if decode_only else 'code'} here is about {lh}x{lw} at this "
              f"aspect ratio ({sq[0]}x{sq[1]} square): downscale or tile it")
