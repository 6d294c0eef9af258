"""The baseline the hyperprior replaces: one static histogram of indices per granularity.

Control-GIC prices its indices with a static code fitted on training usage counts. We
fit that histogram on the training images at the same rate setting (lambda, ratios) as
the images it prices, so the baseline is as strong as a static code can be, with add-one
smoothing so an index never seen in training still has a finite cost. Two code lengths:
the ideal adaptive-free arithmetic code (-log2 p), and Huffman's integer lengths.
"""
import heapq
from typing import Dict, Iterable

import numpy as np



def fit_counts(cmodel, images: Iterable[np.ndarray], lmbda: float, ratios) -> Dict[str, np.ndarray]:
  """Index usage {branch: int64 [K]} over the sent positions of `images` at one rate
  setting (a branch is a granularity, or one residual stage of it)."""
  from hvq_jax import codec, layout
  k = cmodel.cfg.codebook_size
  counts = {b: np.zeros(k, np.int64) for b, _, _ in cmodel.branches}
  for img in images:
    lat = codec.encode_latents(cmodel, img, lmbda, ratios)
    masks = layout.sent_masks(lat["gmap"], tuple(cmodel.cfg.strides))
    for b, g, _ in cmodel.branches:
      sent = np.asarray(lat["indices"][b])[masks[g]]
      counts[b] += np.bincount(sent, minlength=k)
  return counts


def ideal_lengths(counts: np.ndarray) -> np.ndarray:
  """Bits per symbol of an arithmetic code with the add-one-smoothed histogram: [K]."""
  c = np.asarray(counts, np.float64) + 1.0
  return -np.log2(c / c.sum())


def huffman_lengths(counts: np.ndarray) -> np.ndarray:
  """Huffman code lengths (integers) for the add-one-smoothed histogram: [K].

  Written here rather than taken from a package: only the lengths are needed, and the
  classic heap merge is a dozen lines.
  """
  c = np.asarray(counts, np.float64) + 1.0
  if c.size == 1:
    return np.ones(1, np.int64)
  lengths = np.zeros(c.size, np.int64)
  heap = [(w, i, [i]) for i, w in enumerate(c)]   # (weight, tiebreak, symbols)
  heapq.heapify(heap)
  tie = c.size
  while len(heap) > 1:
    w1, _, s1 = heapq.heappop(heap)
    w2, _, s2 = heapq.heappop(heap)
    lengths[s1] += 1
    lengths[s2] += 1
    heapq.heappush(heap, (w1 + w2, tie, s1 + s2))
    tie += 1
  return lengths


def price(indices: Dict[str, np.ndarray], counts: Dict[str, np.ndarray]) -> Dict[str, float]:
  """Bits of the sent indices {branch: int [n]} under the static code: ideal and Huffman
  in total, and the ideal code per branch (`per_branch`)."""
  per_branch = {b: float(ideal_lengths(counts[b])[idx].sum()) if len(idx) else 0.0
                for b, idx in indices.items()}
  huff = sum(float(huffman_lengths(counts[b])[idx].sum()) for b, idx in indices.items() if len(idx))
  return dict(static=sum(per_branch.values()), huffman=huff, per_branch=per_branch)
