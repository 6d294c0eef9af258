"""compress / decompress: the networks on the device, the integer entropy path, the container.

Portability: the encoder's networks decide the symbols (indices, z_hat, the map), which
are sent as they are; every frequency comes from integers (entropy/integer.py), identical
on any device and in PyTorch; the container's symbol digest catches any decoder that did
not follow the encoder. Only the pixels the float synthesis network makes from the
decoded indices may differ between devices, by float rounding.

The encoder decodes its own symbols to fit the file's colour transform (hvq_jax/colour.py)
to the original; the decoder applies it, in integers, to the network's uint8 output.

`code_image` and `decode_image` take a `timer` (a context manager per stage: "model",
"pmf", "range_coding", "colour"); `codec/profile.py` passes one, everything else the no-op.
"""
import contextlib
import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax import colour as colour_lib
from hvq_jax import compile_cache
from hvq_jax import images as images_lib
from hvq_jax import layout
from hvq_jax.codec.memory import check_size
from hvq_jax.codec.model import CodecModel
from hvq_jax.entropy import bitstream, streams
from hvq_jax.entropy.bitstream import BitstreamError

Timer = Callable[[str], contextlib.AbstractContextManager]
NO_TIMER: Timer = lambda stage: contextlib.nullcontext()


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


def _encoder(model):
  from hvq_jax.nn import model as model_lib
  return lambda params, *a: model.apply({"params": params}, *a,
                                        method=model_lib.HVQ.encode_latents)


def _decoder(model, out_hw):
  from hvq_jax.nn import model as model_lib
  def f(p, idx, gmap):
    x = model.apply({"params": p}, idx, gmap, out_hw, method=model_lib.HVQ.decode_latents)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return f


# The codec's programs go through compile_cache.executable: with the cache on, a later
# process loads them compiled (no tracing, no flax); without it, they are jax.jit.
def _encode_program(model: CodecModel, args):
  return compile_cache.executable(
      "encode_latents", lambda: _encoder(model.model), args, model.program_key)


def _decode_program(model: CodecModel, out_hw, args):
  return compile_cache.executable(
      "decode_latents", lambda: _decoder(model.model, tuple(out_hw)), args,
      f"{model.program_key}\nout_hw={tuple(out_hw)}")


def prepare_image(model: CodecModel, image) -> np.ndarray:
  """Any accepted image -> uint8 [H, W, 3] that this model can code on this device: at most
  `codec.max_pixels`, and within the memory budget (`codec/memory.py`)."""
  img = images_lib.to_rgb_uint8(image)
  h, w = img.shape[:2]
  limit = int(model.codec["max_pixels"])
  if h * w > limit:
    raise images_lib.ImageError(
        f"image of {h}x{w} = {h * w} pixels is over the limit of {limit} "
        f"(config.codec.max_pixels); downscale or tile it")
  check_size(model, h, w, images_lib.ImageError, decode_only=False)
  return img


def pad_image(img: np.ndarray, multiple: int) -> np.ndarray:
  """Edge-pad uint8 [H, W, 3] on the bottom/right to multiples of `multiple`."""
  h, w = img.shape[:2]
  return np.pad(img, ((0, (-h) % multiple), (0, (-w) % multiple), (0, 0)), mode="edge")


def encode_latents(model: CodecModel, img: np.ndarray, lmbda: float, ratios) -> dict:
  """uint8 [H, W, 3] -> host numpy {gmap [1, hc, wc], indices {branch}, z {branch}} (padded input)."""
  xp = pad_image(np.asarray(img, np.uint8), model.cfg.strides[0])
  # Eager jnp, the division every file so far was made with: XLA computes it (by a
  # reciprocal on CPU) differently from numpy, and differently again fused into a program,
  # and the symbols must not change with that.
  x = jnp.asarray(xp[None], jnp.float32) / 127.5 - 1.0
  args = (model.params, x, np.full((1,), lmbda, np.float32), np.asarray(ratios, np.float32))
  return jax.device_get(_encode_program(model, args)(*args))


def _check_settings(lmbda: float, ratios) -> None:
  if layout.ratios_error(ratios):   # valid settings never import flax
    from hvq_jax.nn import model as model_lib
    model_lib.check_ratios(ratios)    # raises the ConfigError
  if not (np.isfinite(lmbda) and lmbda > 0):
    raise ValueError(f"lambda must be a positive number, got {lmbda}")


def settings(model: CodecModel, lmbda: Optional[float], ratios: Optional[Sequence[float]]):
  """(lambda, ratios) with the model's defaults for what is None, checked."""
  lmbda = model.default_lmbda if lmbda is None else float(lmbda)
  ratios = model.default_ratios if ratios is None else tuple(float(r) for r in ratios)
  _check_settings(lmbda, ratios)
  return lmbda, ratios


def symbols(model: CodecModel, lat: dict) -> dict:
  """The encoder networks' outputs -> every stream's symbols {(kind, branch): int32 grid}:
  the map, the indices and z_hat (clipped to [-z_range, z_range], offset by z_range)."""
  r = int(model.codec["z_range"])
  known = {("map", ""): np.asarray(lat["gmap"][0], np.int32)}
  for k in lat["indices"]:
    known[("y", k)] = np.asarray(lat["indices"][k][0], np.int32)
    if model.hyper_on:
      known[("z", k)] = (np.clip(np.round(lat["z"][k][0]), -r, r) + r).astype(np.int32)
  return known


def decoded_symbols(model: CodecModel, known: dict):
  """The symbols as a decoder has them: (indices {branch: int32 [1, h_g, w_g]}, 0 where
  not sent, as `streams.decode` leaves them; map int32 [1, hc, wc])."""
  gmap = known[("map", "")][None]
  masks = layout.sent_masks(gmap, tuple(model.cfg.strides))
  idx = {k: np.where(masks[g], known[("y", k)][None], 0).astype(np.int32)
         for k, g, _ in layout.branches(model.cfg)}
  return idx, gmap


def synthesize(model: CodecModel, indices: dict, gmap: np.ndarray, h: int, w: int) -> np.ndarray:
  """Decoded symbols -> the synthesis network's uint8 [H, W, 3] (no colour transform)."""
  hp, wp = layout.padded_size(h, w, model.cfg.strides[0])
  args = (model.params, {k: np.asarray(v) for k, v in indices.items()}, np.asarray(gmap))
  out = jax.device_get(_decode_program(model, (hp, wp), args)(*args))
  return np.asarray(out)[0, :h, :w]


def code_image(model: CodecModel, img: np.ndarray, lmbda: float, ratios,
               timer: Timer = NO_TIMER, colour: bool = True) -> Tuple[bytes, streams.Recorder]:
  """A prepared uint8 image and checked settings -> (.hvq bytes, the streams as coded).
  colour=False sends the identity transform (and skips the decode the fit needs)."""
  h, w = img.shape[:2]
  hw = layout.padded_size(h, w, model.cfg.strides[0])
  with timer("model"):
    known = symbols(model, encode_latents(model, img, lmbda, ratios))
  counts = tuple(int(c) for c in np.bincount(known[("map", "")].reshape(-1), minlength=3))
  with _one_blas_thread():
    rec = streams.encode(model.tables, model.cfg, int(model.codec["z_range"]), known,
                         (h, w), counts, hw, model.index_weights, timer)
  with timer("range_coding"):
    payload = bitstream.encode_streams(rec.streams)
  words = colour_lib.IDENTITY
  if colour:
    with timer("colour"):
      words = colour_lib.fit(synthesize(model, *decoded_symbols(model, known), h, w), img)
  header = bitstream.Header(model.fingerprint, h, w, lmbda, counts, bytes(8),
                            bitstream.FORMAT_VERSION, words)
  header = dataclasses.replace(header, symbols=rec.digest(bitstream.colour_bytes(header)))
  return bitstream.pack(header, payload), rec


def compress(model: CodecModel, image, lmbda: Optional[float] = None,
             ratios: Optional[Sequence[float]] = None,
             target_bpp: Optional[float] = None, colour: bool = True) -> bytes:
  """uint8 image [H, W] / [H, W, 3|4] -> .hvq bytes.

  With `target_bpp` the rate settings are searched (`search_rate`, starting from `ratios`).
  colour=False: the identity colour transform (hvq_jax/colour.py), no decode at the encoder.
  """
  img = prepare_image(model, image)
  if target_bpp is not None:
    return search_rate(model, img, target_bpp, ratios, colour=colour)[0]
  return code_image(model, img, *settings(model, lmbda, ratios), colour=colour)[0]


def decode_indices(model: CodecModel, data: bytes, timer: Timer = NO_TIMER):
  """Entropy-decode only: .hvq bytes -> (header, indices {branch: int32 [1, h_g, w_g]} with 0
  at unsent positions, granularity map int32 [1, hc, wc])."""
  header, payload, hw = streams.read_header(data, model.fingerprint, model.cfg,
                                           model.codec["max_pixels"])
  check_size(model, header.height, header.width, BitstreamError, decode_only=True)
  with _one_blas_thread():
    gmap, indices = streams.decode(model.tables, model.cfg, int(model.codec["z_range"]),
                                   header, payload, hw, model.index_weights, timer)
  return header, indices, gmap


def decode_image(model: CodecModel, data: bytes, timer: Timer = NO_TIMER) -> np.ndarray:
  """.hvq bytes -> uint8 [H, W, 3]: the indices, the synthesis network, the colour transform."""
  header, indices, gmap = decode_indices(model, data, timer)
  with timer("model"):
    out = synthesize(model, indices, gmap, header.height, header.width)
  if header.colour is None:
    return out
  with timer("colour"):
    return colour_lib.apply(out, header.colour)


def decompress(model: CodecModel, data: bytes) -> np.ndarray:
  """.hvq bytes -> uint8 [H, W, 3]. Raises BitstreamError for anything not decodable."""
  return decode_image(model, data)


# ---- rate search ----------------------------------------------------------------------------
def search_rate(model: CodecModel, image, target_bpp: float,
                ratios: Optional[Sequence[float]] = None, iters: int = 8, colour: bool = True):
  """Best quality whose real file is at most `target_bpp`: bisect log(lambda) over the
  trained range (x/÷ 8); if even the largest lambda is over, make the ratios coarser.

  Returns (bytes, lambda, ratios, bpp). The trials are coded without the colour fit (its
  24 bytes are there either way), the chosen file once more with it.
  """
  img = prepare_image(model, image)
  if not (np.isfinite(target_bpp) and target_bpp > 0):
    raise ValueError(f"target bpp must be a positive number, got {target_bpp}")
  hw = img.shape[0] * img.shape[1]
  base = model.default_ratios if ratios is None else tuple(float(r) for r in ratios)
  lams = [float(v) for v in model.config.rd.lambdas]
  lo, hi = np.log(min(lams) / 8), np.log(max(lams) * 8)
  bpp = lambda d: 8 * len(d) / hw
  trial = lambda lam, r: compress(model, img, lam, r, colour=False)
  # the file as sent: the same payload and size, the transform fitted
  def final(d, lam, r):
    d = compress(model, img, lam, r) if colour else d
    return d, lam, r, bpp(d)
  top = trial(float(np.exp(hi)), base)
  if bpp(top) > target_bpp:
    for t in np.linspace(1.0, 0.0, 6)[1:]:  # move fine/medium mass to coarse
      rt = (1 - t * (base[1] + base[2]), t * base[1], t * base[2])
      top = trial(float(np.exp(hi)), rt)
      if bpp(top) <= target_bpp:
        break
    return final(top, float(np.exp(hi)), rt)   # (or the smallest we can make)
  best = (top, float(np.exp(hi)), base)
  for _ in range(iters):
    mid = (lo + hi) / 2
    d = trial(float(np.exp(mid)), base)
    if bpp(d) <= target_bpp:
      best, hi = (d, float(np.exp(mid)), base), mid
    else:
      lo = mid
  return final(*best)
