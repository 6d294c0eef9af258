"""One walk over a file's streams, shared by the encoder and every decoder.

`walk` goes through `layout.stream_plan` in order and, for each stream, builds the integer
weights (entropy/integer.py) from what was coded before it: the map from the header's
counts, z from its factorized tables, the indices from the integer hyper-synthesis of the
z just coded. The encoder passes a `Recorder` (it knows the symbols and keeps each
stream's weights for the range coder), a decoder a `Reader` (it decodes them), so both
sides run literally the same code. Both hash the symbols they coded, with the header
fields that shape them, into the digest the container carries (the desync check).
"""
import contextlib
import hashlib
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from hvq_jax import layout
from hvq_jax.entropy import bitstream, integer
from hvq_jax.entropy.bitstream import BitstreamError


def _digest_start(h: int, w: int, counts) -> "hashlib._Hash":
  d = hashlib.sha256(b"hvq-symbols")
  d.update(np.asarray([h, w, *counts], "<i8").tobytes())
  return d


class Recorder:
  """Encoder side: `known` {(kind, branch): symbol grid} (map: [hc, wc]; z: [h_z, w_z, C],
  offset by z_range; y: [h, w]) -> the streams (symbols, float32 weights) to range-code."""

  def __init__(self, known: Dict[Tuple[str, str], np.ndarray], h: int, w: int, counts):
    self.known = known
    self.counts = tuple(counts)
    self.streams = []
    self.names = []
    self.priors = {}   # branch -> integer (mu, log-sigma) at the sent positions (evaluation)
    self._digest = _digest_start(h, w, counts)

  def code(self, stream: layout.Stream, weights: np.ndarray, where=None) -> np.ndarray:
    grid = self.known[(stream.kind, stream.branch)]
    sym = np.ascontiguousarray((grid if where is None else grid[where]).reshape(-1), np.int32)
    self.streams.append((sym, weights))
    self.names.append(stream)
    self._digest.update(sym.astype("<i4").tobytes())
    return sym

  def digest(self, extra: bytes = b"") -> bytes:
    """The symbols' digest, `extra` (format 4: the colour words) folded in last."""
    d = self._digest.copy()
    d.update(extra)
    return d.digest()[:8]

  def observe(self, stream: layout.Stream, mu: np.ndarray, ls: np.ndarray) -> None:
    """Keep a stream's priors, a branch's passes one after the other (as coded)."""
    if stream.branch in self.priors:
      mu0, ls0 = self.priors[stream.branch]
      mu, ls = np.concatenate([mu0, mu]), np.concatenate([ls0, ls])
    self.priors[stream.branch] = (mu, ls)


class Reader:
  """Decoder side: decodes each stream from the payload."""

  def __init__(self, payload: np.ndarray, h: int, w: int, counts):
    self._dec = bitstream.StreamDecoder(payload)
    self._digest = _digest_start(h, w, counts)

  def code(self, stream: layout.Stream, weights: np.ndarray, where=None) -> np.ndarray:
    sym = self._dec.decode(weights)
    self._digest.update(sym.astype("<i4").tobytes())
    return sym

  digest = Recorder.digest

  def exhausted(self) -> bool:
    return self._dec.exhausted()

  def observe(self, stream: layout.Stream, mu: np.ndarray, ls: np.ndarray) -> None:
    """The decoder keeps no priors."""


def numpy_index_weights(tables: Dict[str, integer.BranchTables]):
  return lambda key, mu, ls: integer.branch_index_weights(tables[key], mu, ls)


def walk(io, tables: Dict[str, integer.BranchTables], model_cfg, z_range: int, counts,
         hp: int, wp: int, index_weights: Optional[Callable] = None,
         timer: Optional[Callable] = None):
  """Code every stream of a padded hp x wp image with granularity `counts` through `io`.

  Returns (gmap int32 [1, hc, wc], indices {branch: int32 [1, h_g, w_g]} with 0 at unsent
  positions). `index_weights(branch, mu, ls)` -> [n, K] may run on a device (the default
  is numpy); its integers must equal `integer.index_weights`'. `timer(stage)`, a context
  manager, times the integer hyper-synthesis ("model") and the tables ("pmf").
  """
  index_weights = index_weights or numpy_index_weights(tables)
  timer = timer or (lambda stage: contextlib.nullcontext())
  strides = tuple(model_cfg.strides)
  hyper_on = bool(model_cfg.hyperprior.enabled)
  hc, wc = hp // strides[0], wp // strides[0]
  n = hc * wc
  plan = layout.stream_plan(model_cfg, counts)
  map_w = np.broadcast_to(integer.count_weights(counts, 3).astype(np.float32), (n, 3))
  gmap = io.code(plan[0], map_w).reshape(1, hc, wc)
  if gmap.max(initial=0) > 2 or not np.array_equal(np.bincount(gmap.reshape(-1), minlength=3)[:3],
                                                    np.asarray(counts)):
    raise BitstreamError("decoded granularity map contradicts the header's counts")
  masks = layout.sent_masks(gmap, strides)
  grids = layout.grids(hp, wp, strides)
  zmasks = {}
  if hyper_on:
    if model_cfg.hyperprior.mask_z:
      zmasks = layout.z_masks(masks, model_cfg.hyperprior.num_down)
    else:
      zmasks = {g: np.ones((1,) + layout.z_grid(*grids[g], model_cfg.hyperprior.num_down), bool)
                for g in grids}
  z_hat, indices, feats = {}, {}, {}
  n_passes = layout.num_passes(model_cfg) if hyper_on else 1
  for st in plan[1:]:
    t = tables[st.branch]
    if st.kind == "z":
      zm = zmasks[st.granularity][0]
      c = t.z_weights.shape[0]
      w = np.tile(t.z_weights.astype(np.float32), (int(zm.sum()), 1))
      with timer("range_coding"):
        sym = io.code(st, w, zm)
      z = np.zeros(zm.shape + (c,), np.int64)
      z[zm] = sym.reshape(-1, c).astype(np.int64) - z_range
      z_hat[st.branch] = z
    else:
      grid = grids[st.granularity]
      mask = masks[st.granularity][0]
      passes = layout.pass_map(*grid, n_passes)
      where = mask & (passes == st.part)
      idx = indices[st.branch][0] if st.part else np.zeros(grid, np.int32)
      if hyper_on:
        with timer("model"):
          if st.part == 0:   # what every pass's last layer reads, once per branch
            ctx = None
            if t.context:   # hyperprior.context: the coarser granularities are decoded
              ctx = integer.context_map(
                  st.granularity, {g: m[0] for g, m in masks.items()},
                  {g: indices[g][0] for g in layout.GRANULARITIES if g in indices},
                  {g: tables[g].ctx_entries for g in layout.GRANULARITIES}, strides, t.ctx_bits)
            feats[st.branch] = integer.features(t, z_hat[st.branch], grid, ctx)
          sp = None
          if st.part:   # hyperprior.spatial: this granularity's earlier passes are decoded
            sp = integer.spatial_map(t.ctx_entries, idx, mask, passes, st.part, t.ctx_bits)
          mu, ls = integer.head(t, feats[st.branch], grid, sp)
        with timer("pmf"):
          w = index_weights(st.branch, mu[where], ls[where])
        io.observe(st, mu[where], ls[where])
      else:
        w = np.broadcast_to(t.static, (int(where.sum()), t.static.size))
      with timer("range_coding"):
        sym = io.code(st, np.asarray(w, np.float32), where)
      idx = idx.copy()
      idx[where] = sym
      indices[st.branch] = idx[None]
  for k, g, _ in layout.branches(model_cfg):
    indices.setdefault(k, np.zeros((1,) + grids[g], np.int32))
  return gmap.astype(np.int32), indices


def read_header(data: bytes, fingerprint: bytes, model_cfg, max_pixels: int):
  """Unpack and check a file against a model: (header, payload, padded (hp, wp))."""
  header, payload = bitstream.unpack(data)
  if header.fingerprint != fingerprint:
    raise BitstreamError("bitstream was written by a different model (fingerprint "
                         f"{header.fingerprint.hex()}, this model {fingerprint.hex()})")
  want = layout.payload_version(model_cfg)
  if header.version not in (want, bitstream.FORMAT_VERSION):
    raise BitstreamError(f"format version {header.version} for a model whose files are "
                         f"version {want} or {bitstream.FORMAT_VERSION} (version 3: indices in "
                         f"spatial passes, hyperprior.spatial={model_cfg.hyperprior.spatial!r} here)")
  h, w = header.height, header.width
  if h * w > int(max_pixels):
    raise BitstreamError(f"image size {h}x{w} in header is over this model's limit")
  hp, wp = layout.padded_size(h, w, model_cfg.strides[0])
  n = (hp // model_cfg.strides[0]) * (wp // model_cfg.strides[0])
  if sum(header.counts) != n:
    raise BitstreamError(f"granularity counts {tuple(header.counts)} do not add up to the {n} "
                         f"patches of a {h}x{w} image")
  return header, payload, (hp, wp)


def encode(tables, model_cfg, z_range: int, known, hw_image, counts, hw, index_weights=None,
           timer=None) -> Recorder:
  """Entropy-model an image whose symbols are `known` (`Recorder`): the Recorder holds each
  stream's symbols and weights for the range coder, the symbol digest and the priors."""
  rec = Recorder(known, *hw_image, counts)
  walk(rec, tables, model_cfg, z_range, counts, *hw, index_weights, timer)
  return rec


def decode(tables, model_cfg, z_range: int, header, payload, hw, index_weights=None,
           timer=None):
  """Entropy-decode a checked file: (gmap, indices); raises BitstreamError when the
  decoded symbols do not match the file's symbol digest."""
  reader = Reader(payload, header.height, header.width, header.counts)
  gmap, indices = walk(reader, tables, model_cfg, z_range, header.counts, *hw, index_weights,
                       timer)
  if reader.digest(bitstream.colour_bytes(header)) != header.symbols:
    raise BitstreamError("decoded symbols do not match the file's symbol digest: it was "
                         "made with a different model or entropy path, or its payload "
                         "was altered")
  if not reader.exhausted():
    raise BitstreamError("payload has data after its last symbol")
  return gmap, indices
