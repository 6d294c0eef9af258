"""compress / decompress: the networks on the device, the integer entropy path, the container.

Portability: the encoder's networks decide the symbols (indices, z_hat, the map), which
are sent as they are; every frequency comes from integers (entropy/integer.py), identical
on any device and in PyTorch; the container's symbol digest catches any decoder that did
not follow the encoder. Only the pixels the float synthesis network makes from the
decoded indices may differ between devices, by float rounding.
"""
import contextlib
import functools
import time
from typing import Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax import images as images_lib
from hvq_jax import layout
from hvq_jax.codec.model import CodecModel
from hvq_jax.entropy import bitstream, integer, streams
from hvq_jax.entropy.bitstream import BitstreamError
from hvq_jax.nn import model as model_lib


@contextlib.contextmanager
def _stage(timings: Optional[dict], name: str):
  """Adds the block's wall time to timings[name] (benchmarks pass a dict)."""
  if timings is None:
    yield
    return
  t = time.perf_counter()
  yield
  timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
  fn = getattr(model_lib.HVQ, method)
  return jax.jit(lambda params, *a: model.apply({"params": params}, *a, method=fn))


@functools.lru_cache(maxsize=None)
def _decode_fn(model, out_hw):
  def f(p, idx, gmap):
    x = model.apply({"params": p}, idx, gmap, out_hw, method=model_lib.HVQ.decode_latents)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return jax.jit(f)


def prepare_image(model: CodecModel, image) -> np.ndarray:
  """Any accepted image -> uint8 [H, W, 3] within the model's size limit."""
  img = images_lib.to_rgb_uint8(image)
  h, w = img.shape[:2]
  limit = int(model.codec["max_pixels"])
  if h * w > limit:
    raise images_lib.ImageError(
        f"image of {h}x{w} = {h * w} pixels is over the limit of {limit} "
        f"(config.codec.max_pixels); downscale or tile it")
  return img


def pad_image(img: np.ndarray, multiple: int) -> np.ndarray:
  """Edge-pad uint8 [H, W, 3] on the bottom/right to multiples of `multiple`."""
  h, w = img.shape[:2]
  return np.pad(img, ((0, (-h) % multiple), (0, (-w) % multiple), (0, 0)), mode="edge")


def encode_latents(model: CodecModel, img: np.ndarray, lmbda: float, ratios) -> dict:
  """uint8 [H, W, 3] -> host numpy {gmap [1, hc, wc], indices {branch}, z {branch}} (padded input)."""
  xp = pad_image(np.asarray(img, np.uint8), model.cfg.strides[0])
  x = jnp.asarray(xp[None], jnp.float32) / 127.5 - 1.0
  return jax.device_get(_jitted(model.model, "encode_latents")(
      model.params, x, jnp.full((1,), lmbda, jnp.float32), jnp.asarray(ratios, jnp.float32)))


def _check_settings(lmbda: float, ratios) -> None:
  model_lib.check_ratios(ratios)
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
    out = jax.device_get(_decode_fn(model.model, (hp, wp))(
        model.params, {k: jnp.asarray(v) for k, v in indices.items()}, jnp.asarray(gmap)))
  return np.asarray(out)[0, :header.height, :header.width]


def decode_indices(model: CodecModel, data: bytes, timings: Optional[dict] = None):
  """Entropy-decode only: .hvq bytes -> (header, indices {branch: int32 [1, h_g, w_g]} with 0
  at unsent positions, granularity map int32 [1, hc, wc])."""
  header, payload, hw = streams.read_header(data, model.fingerprint, model.cfg,
                                           model.codec["max_pixels"])
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
