"""compress / decompress: the networks on the device, the integer entropy path, the container.

Portability: the encoder's networks decide the symbols (indices, z_hat, the map), which
are sent as they are; every frequency comes from integers (entropy/integer.py), identical
on any device and in PyTorch; the container's symbol digest catches any decoder that did
not follow the encoder. Only the pixels the float synthesis network makes from the
decoded indices may differ between devices, by float rounding.
"""
import contextlib
import functools
import os
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax import compile_cache
from hvq_jax import images as images_lib
from hvq_jax import layout
from hvq_jax.codec.model import CodecModel
from hvq_jax.entropy import bitstream, integer, streams
from hvq_jax.entropy.bitstream import BitstreamError


def _one_blas_thread():
  """The integer hyper-synthesis (entropy/integer.py) is many small float64 matmuls:
  OpenBLAS's threads only add overhead there, and spin against any other load on the
  machine (768x512 decode on 2 busy cores: 1.4-2.4 s threaded, 0.13-0.19 s on one thread).
  Its results are exact integers whatever the summation order, so this changes no number.
  threadpoolctl comes with scikit-learn; without it, BLAS keeps its threads."""
  try:
    import threadpoolctl
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1, user_api="blas")


@contextlib.contextmanager
def _stage(timings: Optional[dict], name: str):
  """Adds the block's wall time to timings[name] (benchmarks pass a dict)."""
  if timings is None:
    yield
    return
  t = time.perf_counter()
  yield
  timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def _method_fn(model, method):
  from hvq_jax.nn import model as model_lib
  fn = getattr(model_lib.HVQ, method)
  return lambda params, *a: model.apply({"params": params}, *a, method=fn)


def _decoder(model, out_hw):
  from hvq_jax.nn import model as model_lib
  def f(p, idx, gmap):
    x = model.apply({"params": p}, idx, gmap, out_hw, method=model_lib.HVQ.decode_latents)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return f


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
  return jax.jit(_method_fn(model, method))


@functools.lru_cache(maxsize=None)
def _decode_fn(model, out_hw):
  return jax.jit(_decoder(model, out_hw))


# The codec's programs go through compile_cache.executable: with the cache on, a later
# process loads them compiled (no tracing, no flax); without it, they are these jax.jit.
def _encode_program(model: CodecModel, args):
  return compile_cache.executable(
      "encode_latents", lambda: _method_fn(model.model, "encode_latents"), args,
      model.program_key)


def _decode_program(model: CodecModel, out_hw, args):
  return compile_cache.executable(
      "decode_latents", lambda: _decoder(model.model, tuple(out_hw)), args,
      f"{model.program_key}\nout_hw={tuple(out_hw)}")


def prepare_image(model: CodecModel, image) -> np.ndarray:
  """Any accepted image -> uint8 [H, W, 3] that this model can code on this device: at most
  `codec.max_pixels`, and within the memory budget (`memory_estimate`, `memory_budget`)."""
  img = images_lib.to_rgb_uint8(image)
  h, w = img.shape[:2]
  limit = int(model.codec["max_pixels"])
  if h * w > limit:
    raise images_lib.ImageError(
        f"image of {h}x{w} = {h * w} pixels is over the limit of {limit} "
        f"(config.codec.max_pixels); downscale or tile it")
  check_size(model, h, w, images_lib.ImageError, decode_only=False)
  return img


# ---- how large an image fits ---------------------------------------------------------------
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
  stages = int(c.get("rvq_stages", 1))
  worst = max(enc_attn + dec_attn, key=lambda a: a[3], default=None)
  return dict(encode=max(enc_act + sum(a[3] for a in enc_attn), stages * 3 * weights),
              decode=dec_act + sum(a[3] for a in dec_attn) + weights,
              attention=worst)


def memory_budget(model: CodecModel) -> Tuple[float, str]:
  """(bytes one image may take, where that figure comes from): `codec.memory_budget_gb`,
  or with 0 there, 75% of the default device's memory (physical memory on a CPU)."""
  gb = float(model.codec.get("memory_budget_gb", 0.0) or 0.0)
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


def _fits(model: CodecModel, h: int, w: int, budget: float, decode_only: bool) -> bool:
  hp, wp = layout.padded_size(h, w, model.cfg.strides[0])
  m = memory_estimate(model.cfg, hp, wp)
  return (m["decode"] if decode_only else max(m["encode"], m["decode"])) <= budget


def largest_size(model: CodecModel, aspect: float = 1.0, decode_only: bool = False,
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


def check_size(model: CodecModel, h: int, w: int, error=images_lib.ImageError,
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


def pad_image(img: np.ndarray, multiple: int) -> np.ndarray:
  """Edge-pad uint8 [H, W, 3] on the bottom/right to multiples of `multiple`."""
  h, w = img.shape[:2]
  return np.pad(img, ((0, (-h) % multiple), (0, (-w) % multiple), (0, 0)), mode="edge")


def encode_latents(model: CodecModel, img: np.ndarray, lmbda: float, ratios) -> dict:
  """uint8 [H, W, 3] -> host numpy {gmap [1, hc, wc], indices {branch}, z {branch}} (padded input)."""
  xp = pad_image(np.asarray(img, np.uint8), model.cfg.strides[0])
  # Eager jnp, as the encoder has always been fed: XLA computes this division (by a
  # reciprocal on CPU) differently from numpy, and differently again fused into a program.
  x = jnp.asarray(xp[None], jnp.float32) / 127.5 - 1.0
  args = (model.params, x, np.full((1,), lmbda, np.float32), np.asarray(ratios, np.float32))
  return jax.device_get(_encode_program(model, args)(*args))


def _check_settings(lmbda: float, ratios) -> None:
  if layout.ratios_error(ratios):   # valid settings never import flax
    from hvq_jax.nn import model as model_lib
    model_lib.check_ratios(ratios)    # raises the ConfigError
  if not (np.isfinite(lmbda) and lmbda > 0):
    raise ValueError(f"lambda must be a positive number, got {lmbda}")


def compress(model: CodecModel, image, lmbda: Optional[float] = None,
             ratios: Optional[Sequence[float]] = None,
             target_bpp: Optional[float] = None, timings: Optional[dict] = None,
             stats: Optional[dict] = None) -> bytes:
  """uint8 image [H, W] / [H, W, 3|4] -> .hvq bytes.

  With `target_bpp` the rate settings are searched (`search_rate`, starting from
  `ratios`). `timings`, if given, receives seconds per stage (model, pmf, range_coding);
  `stats` receives each stream's exact code length in bits (`bits`: map, z, y_coarse,
  ...), the same per branch (`branch_bits`: {branch: {y, z, n}}), the sent indices
  {branch: int32 [n]} (`indices`) and the integer prior at those positions (`priors`:
  {branch: (mu [n, D], log-sigma index [n, D])}), for evaluation.
  """
  img = prepare_image(model, image)
  if target_bpp is not None:
    return search_rate(model, img, target_bpp, ratios)[0]
  lmbda = model.default_lmbda if lmbda is None else float(lmbda)
  ratios = model.default_ratios if ratios is None else tuple(float(r) for r in ratios)
  _check_settings(lmbda, ratios)
  h, w = img.shape[:2]
  hp, wp = layout.padded_size(h, w, model.cfg.strides[0])
  with _stage(timings, "model"):
    lat = encode_latents(model, img, lmbda, ratios)
  gmap = np.asarray(lat["gmap"][0], np.int32)
  counts = tuple(int(c) for c in np.bincount(gmap.reshape(-1), minlength=3))
  r = int(model.codec["z_range"])
  known = {("map", ""): gmap}
  for k in lat["indices"]:
    known[("y", k)] = np.asarray(lat["indices"][k][0], np.int32)
    if model.hyper_on:
      known[("z", k)] = (np.clip(np.round(lat["z"][k][0]), -r, r) + r).astype(np.int32)
  rec = streams.Recorder(known, h, w, counts)
  with _one_blas_thread():
    streams.walk(rec, model.tables, model.cfg, r, counts, hp, wp, model.index_weights,
                 functools.partial(_stage, timings))
  with _stage(timings, "range_coding"):
    payload = bitstream.encode_streams(rec.streams)
  if stats is not None:
    _fill_stats(stats, rec, counts)
  if timings is not None:
    timings["symbols"] = timings.get("symbols", 0) + sum(len(s) for s, _ in rec.streams)
  header = bitstream.Header(model.fingerprint, h, w, lmbda, counts, rec.digest())
  return bitstream.pack(header, payload)


def _fill_stats(stats: dict, rec: "streams.Recorder", counts) -> None:
  bits = {k: 0.0 for k in ["map", "z"] + [f"y_{g}" for g in layout.GRANULARITIES]}
  per_branch = {}
  indices = {}
  for st, (sym, wts) in zip(rec.names, rec.streams):
    b = float(integer.code_lengths(wts, sym).sum()) if len(sym) else 0.0
    bits["map" if st.kind == "map" else "z" if st.kind == "z" else f"y_{st.granularity}"] += b
    if st.kind != "map":
      d = per_branch.setdefault(st.branch, dict(y=0.0, z=0.0, n=0))
      d["z" if st.kind == "z" else "y"] += b
      d["n"] += len(sym) if st.kind == "y" else 0
    if st.kind == "y":
      indices[st.branch] = sym
  stats.update(bits=bits, branch_bits=per_branch, indices=indices, counts=tuple(counts),
               priors=rec.priors)


def decompress(model: CodecModel, data: bytes, timings: Optional[dict] = None) -> np.ndarray:
  """.hvq bytes -> uint8 [H, W, 3]. Raises BitstreamError for anything not decodable."""
  header, indices, gmap = decode_indices(model, data, timings)
  hp, wp = layout.padded_size(header.height, header.width, model.cfg.strides[0])
  with _stage(timings, "model"):
    args = (model.params, {k: np.asarray(v) for k, v in indices.items()}, np.asarray(gmap))
    out = jax.device_get(_decode_program(model, (hp, wp), args)(*args))
  return np.asarray(out)[0, :header.height, :header.width]


def decode_indices(model: CodecModel, data: bytes, timings: Optional[dict] = None):
  """Entropy-decode only: .hvq bytes -> (header, indices {branch: int32 [1, h_g, w_g]} with 0
  at unsent positions, granularity map int32 [1, hc, wc])."""
  header, payload, hw = streams.read_header(data, model.fingerprint, model.cfg,
                                           model.codec["max_pixels"])
  check_size(model, header.height, header.width, BitstreamError, decode_only=True)
  with _one_blas_thread():
    gmap, indices = streams.decode(model.tables, model.cfg, int(model.codec["z_range"]),
                                   header, payload, hw, model.index_weights,
                                   functools.partial(_stage, timings))
  return header, indices, gmap


# ---- rate search ----------------------------------------------------------------------------
def search_rate(model: CodecModel, image, target_bpp: float,
                ratios: Optional[Sequence[float]] = None, iters: int = 8):
  """Best quality whose real file is at most `target_bpp`: bisect log(lambda) over the
  trained range (x/÷ 8); if even the largest lambda is over, make the ratios coarser.

  Returns (bytes, lambda, ratios, bpp).
  """
  img = prepare_image(model, image)
  if not (np.isfinite(target_bpp) and target_bpp > 0):
    raise ValueError(f"target bpp must be a positive number, got {target_bpp}")
  hw = img.shape[0] * img.shape[1]
  base = model.default_ratios if ratios is None else tuple(float(r) for r in ratios)
  lams = [float(v) for v in model.config.rd.lambdas]
  lo, hi = np.log(min(lams) / 8), np.log(max(lams) * 8)
  bpp = lambda d: 8 * len(d) / hw
  top = compress(model, img, float(np.exp(hi)), base)
  if bpp(top) > target_bpp:
    for t in np.linspace(1.0, 0.0, 6)[1:]:  # move fine/medium mass to coarse
      rt = (1 - t * (base[1] + base[2]), t * base[1], t * base[2])
      top = compress(model, img, float(np.exp(hi)), rt)
      if bpp(top) <= target_bpp:
        return top, float(np.exp(hi)), rt, bpp(top)
    return top, float(np.exp(hi)), rt, bpp(top)   # the smallest we can make
  best = (top, float(np.exp(hi)), base, bpp(top))
  for _ in range(iters):
    mid = (lo + hi) / 2
    d = compress(model, img, float(np.exp(mid)), base)
    if bpp(d) <= target_bpp:
      best, hi = (d, float(np.exp(mid)), base, bpp(d)), mid
    else:
      lo = mid
  return best
