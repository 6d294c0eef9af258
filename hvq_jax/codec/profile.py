"""What coding an image costs: seconds per stage and exact bits per stream.

The profiling path for `benchmarks/` and `hvq eval`: the same `code_image`/`decode_image`
as `compress`/`decompress`, with a timer passed in and the coded streams read back.
"""
import contextlib
import time
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from hvq_jax import layout
from hvq_jax.codec import coder
from hvq_jax.codec.model import CodecModel
from hvq_jax.entropy import integer, streams


class StageTimer:
  """A `coder.Timer` that adds each stage's wall time to `seconds[stage]`."""

  def __init__(self):
    self.seconds: Dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, stage: str):
    t = time.perf_counter()
    yield
    self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


def stream_stats(rec: streams.Recorder) -> dict:
  """The coded streams' exact code lengths in bits (`bits`: map, z, y_coarse, ...), the same
  per branch (`branch_bits`: {branch: {y, z, n}}), the sent indices {branch: int32 [n]}
  (`indices`, a branch's passes one after the other), the map's counts, the integer prior
  at the sent positions in the same order (`priors`: {branch: (mu [n, D], log-sigma index
  [n, D])}), and each index stream's bits and size (`pass_bits`: {branch: [(bits, n)]
  per spatial pass})."""
  bits = {k: 0.0 for k in ["map", "z"] + [f"y_{g}" for g in layout.GRANULARITIES]}
  per_branch, indices, passes = {}, {}, {}
  for st, (sym, wts) in zip(rec.names, rec.streams):
    b = float(integer.code_lengths(wts, sym).sum()) if len(sym) else 0.0
    bits["map" if st.kind == "map" else "z" if st.kind == "z" else f"y_{st.granularity}"] += b
    if st.kind != "map":
      d = per_branch.setdefault(st.branch, dict(y=0.0, z=0.0, n=0))
      d["z" if st.kind == "z" else "y"] += b
      d["n"] += len(sym) if st.kind == "y" else 0
    if st.kind == "y":
      indices[st.branch] = np.concatenate([indices.get(st.branch, np.zeros(0, np.int32)), sym])
      passes.setdefault(st.branch, []).append((b, len(sym)))
  return dict(bits=bits, branch_bits=per_branch, indices=indices, counts=rec.counts,
              priors=rec.priors, pass_bits=passes)


def compress(model: CodecModel, image, lmbda: Optional[float] = None,
             ratios: Optional[Sequence[float]] = None, colour: bool = True) -> Tuple[bytes, dict]:
  """`coder.compress` that also returns what the file holds: `stream_stats` plus `seconds`
  per stage (model, pmf, range_coding, colour: the decode and fit of the colour transform)
  and the number of coded `symbols`."""
  img = coder.prepare_image(model, image)
  timer = StageTimer()
  data, rec = coder.code_image(model, img, *coder.settings(model, lmbda, ratios), timer,
                               colour=colour)
  out = stream_stats(rec)
  out.update(seconds=timer.seconds, symbols=sum(len(s) for s, _ in rec.streams))
  return data, out


def decompress(model: CodecModel, data: bytes) -> Tuple[np.ndarray, Dict[str, float]]:
  """`coder.decompress` that also returns the seconds per stage."""
  timer = StageTimer()
  return coder.decode_image(model, data, timer), timer.seconds
