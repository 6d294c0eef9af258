"""DISTS as an evaluation metric on uint8 images, with the reason when it cannot run.

DISTS is computed on the full-size image, as MS-ILLM (NeuralCompression's DISTS metric,
i.e. DISTS_pytorch) and DiffEIC report it. Evaluation compares one original with many
reconstructions in a row, so the original's VGG features are kept for the next call.
"""
import hashlib
from typing import Optional

import numpy as np


class DistsMetric:
  """DISTS(original, decoded) -> float, or None with `reason` set when weights are missing."""

  def __init__(self, lpips_weights: Optional[str] = None, alpha_beta: Optional[str] = None):
    from hvq_jax.nn import dists
    self.reason = None
    try:
      self.params = dists.load_params(lpips_weights, alpha_beta)
    except dists.WeightsError as e:
      self.params, self.reason = None, str(e)
      return
    import jax
    module = dists.DISTS()
    self._features = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.features))
    self._compare = jax.jit(lambda p, a, b: module.apply({"params": p}, a, b, method=module.compare))
    self._cached = (None, None)

  @property
  def available(self) -> bool:
    return self.params is not None

  def _ref_features(self, a):
    key = (a.shape, hashlib.sha1(np.ascontiguousarray(a)).hexdigest())
    if self._cached[0] != key:
      self._cached = (None, None)    # free the old features first
      self._cached = (key, self._features(self.params, self._to(a)))
    return self._cached[1]

  @staticmethod
  def _to(x):
    return np.asarray(x, np.float32)[None] / 255.0

  def __call__(self, a: np.ndarray, b: np.ndarray) -> Optional[float]:
    if self.params is None:
      return None
    fb = self._features(self.params, self._to(b))
    return float(self._compare(self.params, self._ref_features(a), fb)[0])
