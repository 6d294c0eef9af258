"""Real compression: image -> .hvq bytes -> image, with a model loaded from a checkpoint.

Determinism (METHOD.md "Real entropy coding"): encoder and decoder run the same jitted
hyper-synthesis on the same z_hat with batch 1 on one device, quantise mu and
log(sigma) to a fixed grid, and build every PMF in float64 numpy; constriction turns
those into integer frequencies the same way on both sides. z_hat is clipped to
[-z_range, z_range] before anything depends on it, so both sides see the same value.
"""
import contextlib
import functools
import hashlib
import json
import os
import time
from typing import Dict, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections

from hvq_jax import bitstream, granularity
from hvq_jax import images as images_lib
from hvq_jax import model as model_lib
from hvq_jax.bitstream import BitstreamError
from hvq_jax.encoder import GRANULARITIES

DEFAULT_CODEC = dict(mu_step=2.0 ** -12, log_sigma_step=2.0 ** -8, z_range=64,
                     max_pixels=4096 * 4096, pmf_chunk=2048)


class CheckpointError(FileNotFoundError):
  """No usable checkpoint where one was asked for; the message names the directory."""


def fingerprint(params, model_cfg) -> bytes:
  """8 bytes of sha256 over the params (in tree order) and the model config."""
  h = hashlib.sha256(json.dumps(json.loads(model_cfg.to_json()), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.digest()[:8]


def index_pmfs(mu: np.ndarray, sigma: np.ndarray, codebook: np.ndarray, mu_step: float,
               log_sigma_step: float, chunk: int = 2048,
               log_prior: Optional[np.ndarray] = None, mix_logit: float = -np.inf) -> np.ndarray:
  """[n, D] mu, sigma -> [n, K] float64 PMFs on the quantised (mu, log sigma) grid,
  with the static per-entry logits `log_prior` [K] and the static mixture weight
  sigmoid(mix_logit) when the model has them (rate.py)."""
  cb = np.asarray(codebook, np.float64)
  bias = 0.0 if log_prior is None else np.asarray(log_prior, np.float64)[None]
  eps = 0.0 if not np.isfinite(mix_logit) else 1.0 / (1.0 + np.exp(-float(mix_logit)))
  if eps:
    b = np.asarray(log_prior, np.float64)
    static = np.exp(b - b.max())
    static /= static.sum()
  mu_q = np.round(np.asarray(mu, np.float64) / mu_step) * mu_step
  inv = np.exp(-np.round(np.log(np.asarray(sigma, np.float64)) / log_sigma_step) * log_sigma_step)
  out = np.empty((mu_q.shape[0], cb.shape[0]), np.float64)
  for s in range(0, mu_q.shape[0], chunk):
    d = (cb[None] - mu_q[s:s + chunk, None]) * inv[s:s + chunk, None]
    logits = -0.5 * np.einsum("nkd,nkd->nk", d, d) + bias
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    out[s:s + chunk] = (1.0 - eps) * p + eps * static[None] if eps else p
  return out


@contextlib.contextmanager
def _stage(timings: Optional[dict], name: str):
  """Adds the block's wall time to timings[name] (benchmarks pass a dict)."""
  if timings is None:
    yield
    return
  t = time.perf_counter()
  yield
  timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


def _z_grid(h: int, w: int, num_down: int):
  for _ in range(num_down):
    h, w = -(-h // 2), -(-w // 2)
  return h, w


class CodecModel:
  """A trained model ready to code: params, config, fingerprint and prior tables."""

  def __init__(self, config, params):
    self.config = config
    self.cfg = config.model
    self.model = model_lib.build(config.model)
    self.params = params
    codec = dict(DEFAULT_CODEC)
    codec.update(config.get("codec", {}) or {})
    self.codec = codec
    self.fingerprint = fingerprint(params, config.model)
    r = int(codec["z_range"])
    support = jnp.arange(-r, r + 1)
    # hyperprior.enabled=False is the static-histogram ablation: no z, one PMF per granularity
    self.hyper_on = bool(self.cfg.hyperprior.get("enabled", True))
    # one index stream (and table set) per branch: granularity x residual stage
    self.branches = model_lib.branches(self.cfg)
    keys = [k for k, _, _ in self.branches]
    self.z_tables = {k: np.asarray(jax.device_get(self._apply(
        "z_likelihoods", k, support)), np.float64) for k in keys} if self.hyper_on else {}
    self.codebooks = {k: np.asarray(jax.device_get(self._apply("codebook_entries", k)))
                      for k in keys}
    self.log_priors = {k: np.asarray(jax.device_get(self._apply("index_log_prior", k)))
                       for k in keys}
    self.mix_logits = {k: float(jax.device_get(self._apply("index_mixture_logit", k)))
                       for k in keys}
    self.default_lmbda = float(config.rd.lmbda)
    self.default_ratios = tuple(float(v) for v in config.granularity.ratios)

  def _apply(self, method, *args):
    return _jitted(self.model, method, *[a for a in args if isinstance(a, str)])(
        self.params, *[a for a in args if not isinstance(a, str)])


@functools.lru_cache(maxsize=None)
def _jitted(model, method, *static):
  fn = getattr(model_lib.HVQ, method)
  return jax.jit(lambda params, *a: model.apply({"params": params}, *static, *a, method=fn))


@functools.lru_cache(maxsize=None)
def _prior_fn(model, g, grid_hw):
  return jax.jit(lambda p, z: model.apply({"params": p}, g, z, grid_hw, method=model_lib.HVQ.prior))


@functools.lru_cache(maxsize=None)
def _decode_fn(model, out_hw):
  def f(p, idx, gmap):
    x = model.apply({"params": p}, idx, gmap, out_hw, method=model_lib.HVQ.decode_latents)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return jax.jit(f)


def load_model(ckpt_dir: str, step: Optional[int] = None) -> CodecModel:
  """Load params (EMA params when the run kept them) and config from a training workdir
  or its `checkpoints/` folder."""
  from hvq_jax import checkpoint as ckpt_lib
  from hvq_jax import train
  d = ckpt_dir
  if os.path.isdir(os.path.join(d, "checkpoints")):
    d = os.path.join(d, "checkpoints")
  if not os.path.isdir(d):
    raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
  ck = ckpt_lib.Checkpointer(d, async_save=False)
  if ck.latest_step() is None:
    raise CheckpointError(f"{ckpt_dir}: no checkpoint found (train with `hvq train` first)")
  config = ml_collections.ConfigDict(ck.restore_config(step))
  config.loss.w_lpips = 0.0  # LPIPS weights are not needed to code
  if config.get("mesh"):   # code on one device, whatever mesh trained the checkpoint
    config.mesh.shape = tuple(1 for _ in config.mesh.axes)
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  state = ck.restore(step, trainer.abstract_state)
  ck.close()
  return CodecModel(config, trainer.eval_params(state))


# ---- compress -----------------------------------------------------------------------------
def _prepare(model: CodecModel, image) -> np.ndarray:
  img = images_lib.to_rgb_uint8(image)
  h, w = img.shape[:2]
  limit = int(model.codec["max_pixels"])
  if h * w > limit:
    raise images_lib.ImageError(
        f"image of {h}x{w} = {h * w} pixels is over the limit of {limit} "
        f"(config.codec.max_pixels); downscale or tile it")
  return img


def _pad(img: np.ndarray, m: int) -> np.ndarray:
  h, w = img.shape[:2]
  return np.pad(img, ((0, (-h) % m), (0, (-w) % m), (0, 0)), mode="edge")


def _streams_for_z(model, g, z_hat, zmask):
  """Symbols and PMFs of branch g's z_hat [1, h, w, C] at the sent z positions zmask [1, h, w]."""
  r = int(model.codec["z_range"])
  c = z_hat.shape[-1]
  symbols = (z_hat[zmask].reshape(-1) + r).astype(np.int32)
  channel = np.tile(np.arange(c), symbols.size // c)
  return symbols, model.z_tables[g][channel]


def _z_masks(model, masks, z_shapes):
  """Which z positions are sent: all of them, or (mask_z) those over sent positions."""
  if not model.hyper_on:
    return {}
  if model.cfg.hyperprior.get("mask_z", False):
    zm = model_lib.z_masks({g: jnp.asarray(m) for g, m in masks.items()},
                           model.cfg.hyperprior.num_down)
    return {g: np.asarray(m) for g, m in zm.items()}
  return {g: np.ones(z_shapes[g], bool) for g in masks}


def _index_probs(model, g, z_hat, grid_hw, mask, timings=None):
  """[n_sent, K] PMFs of branch g's indices at the sent positions `mask` [1, h, w]."""
  if not model.hyper_on:
    b = model.log_priors[g].astype(np.float64)
    p = np.exp(b - b.max())
    return np.tile(p / p.sum(), (int(mask.sum()), 1))
  with _stage(timings, "model"):
    mu, sigma = jax.device_get(_prior_fn(model.model, g, grid_hw)(model.params, jnp.asarray(z_hat)))
  m = mask.reshape(-1)
  d = mu.shape[-1]
  with _stage(timings, "pmf"):
    return index_pmfs(mu.reshape(-1, d)[m], sigma.reshape(-1, d)[m], model.codebooks[g],
                    model.codec["mu_step"], model.codec["log_sigma_step"], model.codec["pmf_chunk"],
                    model.log_priors[g], model.mix_logits[g])


def encode_latents(model: CodecModel, img: np.ndarray, lmbda: float, ratios) -> dict:
  """uint8 [H, W, 3] -> host numpy {gmap [1, hc, wc], indices {branch}, z {branch}} (padded input)."""
  xp = _pad(np.asarray(img, np.uint8), model.cfg.strides[0])
  x = jnp.asarray(xp[None], jnp.float32) / 127.5 - 1.0
  return jax.device_get(_jitted(model.model, "encode_latents")(
      model.params, x, jnp.full((1,), lmbda, jnp.float32), jnp.asarray(ratios, jnp.float32)))


def _masks(gmap: np.ndarray, strides) -> Dict[str, np.ndarray]:
  return {g: np.asarray(m) for g, m in model_lib.sent_masks(jnp.asarray(gmap), strides).items()}


def compress(model: CodecModel, image, lmbda: Optional[float] = None,
             ratios: Optional[Sequence[float]] = None,
             target_bpp: Optional[float] = None, timings: Optional[dict] = None,
             stats: Optional[dict] = None) -> bytes:
  """uint8 image [H, W] / [H, W, 3|4] -> .hvq bytes. With `target_bpp`, the rate
  settings are searched (see `search_rate`) and `lmbda`/`ratios` are starting points.
  `timings`, if given, receives seconds per stage (model, pmf, range_coding); `stats`
  receives each stream's ideal code length in bits (`bits`: map, z, y_coarse, ...), the
  same per branch (`branch_bits`: {branch: {y, z, n}}) and the sent indices
  {branch: int32 [n]} (`indices`), for evaluation."""
  img = _prepare(model, image)
  if target_bpp is not None:
    return search_rate(model, img, target_bpp, ratios)[0]
  lmbda = model.default_lmbda if lmbda is None else float(lmbda)
  ratios = model.default_ratios if ratios is None else tuple(float(r) for r in ratios)
  model_lib.check_ratios(ratios)
  if not (np.isfinite(lmbda) and lmbda > 0):
    raise ValueError(f"lambda must be a positive number, got {lmbda}")
  strides = tuple(model.cfg.strides)
  h, w = img.shape[:2]
  with _stage(timings, "model"):
    lat = encode_latents(model, img, lmbda, ratios)
  gmap = np.asarray(lat["gmap"][0], np.int32)
  n = gmap.size
  counts = np.bincount(gmap.reshape(-1), minlength=3)
  streams = [(gmap.reshape(-1), np.tile(counts / n, (n, 1)))]
  names = [("map", None)]   # (stats bucket, branch)
  r = int(model.codec["z_range"])
  masks = _masks(gmap[None], strides)
  zmasks = _z_masks(model, masks, {g: lat["z"][g].shape[:3] for g in lat["z"]})
  z_hats = {}
  sent = lambda g: counts[GRANULARITIES.index(g)] > 0
  for k, g, _ in model.branches:
    if sent(g) and model.hyper_on:
      z_hats[k] = np.clip(np.round(lat["z"][k]), -r, r).astype(np.float32) * zmasks[g][..., None]
      streams.append(_streams_for_z(model, k, z_hats[k], zmasks[g]))
      names.append(("z", k))
  for k, g, _ in model.branches:
    if sent(g):
      idx = np.asarray(lat["indices"][k])
      probs = _index_probs(model, k, z_hats.get(k), idx.shape[1:3], masks[g], timings)
      streams.append((idx.reshape(-1)[masks[g].reshape(-1)], probs))
      names.append((f"y_{g}", k))
  with _stage(timings, "range_coding"):
    payload = bitstream.encode_streams(streams)
  if stats is not None:
    bits = {k: 0.0 for k in ["map", "z"] + [f"y_{g}" for g in GRANULARITIES]}
    per_branch = {}
    for (name, k), (sym, p) in zip(names, streams):
      # constriction gives every symbol at least 2^-24 (its leaky quantisation)
      b = float(-np.log2(np.maximum(p[np.arange(len(sym)), sym], 2.0 ** -24)).sum())
      bits[name] += b
      if k is not None:
        d = per_branch.setdefault(k, dict(y=0.0, z=0.0, n=0))
        d["z" if name == "z" else "y"] += b
        d["n"] += 0 if name == "z" else len(sym)
    stats["bits"] = bits
    stats["branch_bits"] = per_branch
    stats["indices"] = {k: s for (name, k), (s, _) in zip(names, streams) if name.startswith("y_")}
    stats["counts"] = tuple(int(c) for c in counts)
  if timings is not None:
    timings["symbols"] = timings.get("symbols", 0) + sum(len(s[0]) for s in streams)
  header = bitstream.Header(model.fingerprint, h, w, lmbda, tuple(int(c) for c in counts))
  return bitstream.pack(header, payload)


# ---- decompress ---------------------------------------------------------------------------
def decompress(model: CodecModel, data: bytes, timings: Optional[dict] = None) -> np.ndarray:
  """.hvq bytes -> uint8 [H, W, 3]. Raises BitstreamError for anything not decodable."""
  header, indices, gmap = decode_indices(model, data, timings)
  strides = tuple(model.cfg.strides)
  h, w = header.height, header.width
  hp, wp = -(-h // strides[0]) * strides[0], -(-w // strides[0]) * strides[0]
  with _stage(timings, "model"):
    out = jax.device_get(_decode_fn(model.model, (hp, wp))(
        model.params, {k: jnp.asarray(v) for k, v in indices.items()}, jnp.asarray(gmap)))
  return np.asarray(out)[0, :h, :w]


def decode_indices(model: CodecModel, data: bytes, timings: Optional[dict] = None):
  """Entropy-decode only: .hvq bytes -> (header, indices {branch: int32 [1, h_g, w_g]} with 0
  at unsent positions, granularity map int32 [1, hc, wc])."""
  header, payload = bitstream.unpack(data)
  if header.fingerprint != model.fingerprint:
    raise BitstreamError("bitstream was written by a different model (fingerprint "
                         f"{header.fingerprint.hex()}, this model {model.fingerprint.hex()})")
  strides = tuple(model.cfg.strides)
  h, w = header.height, header.width
  if h * w > int(model.codec["max_pixels"]):
    raise BitstreamError(f"image size {h}x{w} in header is over this model's limit")
  hp, wp = -(-h // strides[0]) * strides[0], -(-w // strides[0]) * strides[0]
  hc, wc = hp // strides[0], wp // strides[0]
  counts = np.asarray(header.counts, np.int64)
  n = hc * wc
  if counts.sum() != n:
    raise BitstreamError(f"granularity counts {tuple(counts)} do not add up to the {n} "
                         f"patches of a {h}x{w} image")
  dec = bitstream.StreamDecoder(payload)
  with _stage(timings, "range_coding"):
    gmap = dec.decode(np.tile(counts / n, (n, 1))).reshape(1, hc, wc)
  if not np.array_equal(np.bincount(gmap.reshape(-1), minlength=3)[:3], counts) or gmap.max() > 2:
    raise BitstreamError("decoded granularity map contradicts the header's counts")
  r = int(model.codec["z_range"])
  c = model.cfg.hyperprior.latent_channels
  masks = _masks(gmap, strides)
  zmasks = _z_masks(model, masks, {g: (1,) + _z_grid(hp // s, wp // s, model.cfg.hyperprior.num_down)
                                   for g, s in zip(GRANULARITIES, strides)})
  z_hats = {}
  sent = lambda g: counts[GRANULARITIES.index(g)] > 0
  for k, g, _ in model.branches:
    if sent(g) and model.hyper_on:
      zm = zmasks[g]
      channel = np.tile(np.arange(c), int(zm.sum()))
      with _stage(timings, "range_coding"):
        sym = dec.decode(model.z_tables[k][channel])
      z = np.zeros(zm.shape + (c,), np.float32)
      z[zm] = (sym.astype(np.float32) - r).reshape(-1, c)
      z_hats[k] = z
  indices = {}
  stride = dict(zip(GRANULARITIES, strides))
  for k, g, _ in model.branches:
    grid = (hp // stride[g], wp // stride[g])
    idx = np.zeros((1,) + grid, np.int32)
    if sent(g):
      probs = _index_probs(model, k, z_hats.get(k), grid, masks[g], timings)
      flat = idx.reshape(-1)
      with _stage(timings, "range_coding"):
        flat[masks[g].reshape(-1)] = dec.decode(probs)
      idx = flat.reshape(idx.shape)
    indices[k] = idx
  return header, indices, gmap


# ---- rate search ----------------------------------------------------------------------------
def search_rate(model: CodecModel, image, target_bpp: float,
                ratios: Optional[Sequence[float]] = None, iters: int = 8):
  """Best quality whose real file is at most `target_bpp`: bisect log(lambda) over the
  trained range (x/÷ 8); if even the largest lambda is over, make the ratios coarser.

  Returns (bytes, lambda, ratios, bpp).
  """
  img = _prepare(model, image)
  if not (np.isfinite(target_bpp) and target_bpp > 0):
    raise ValueError(f"target bpp must be a positive number, got {target_bpp}")
  hw = img.shape[0] * img.shape[1]
  base = model.default_ratios if ratios is None else tuple(float(r) for r in ratios)
  lams = [float(v) for v in model.config.rd.lambdas]
  lo, hi = np.log(min(lams) / 8), np.log(max(lams) * 8)
  bpp = lambda d: 8 * len(d) / hw
  best = None
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
