"""Bjøntegaard delta rate: the average rate difference of two RD curves at equal quality.

Both curves are fitted as log(rate) against the quality metric and integrated over the
metric interval they share (VCEG-M33). `method="cubic"` is the original cubic
polynomial fit; `"pchip"` is the piecewise-cubic Hermite interpolation of later
JVET/AOM tools, which does not overshoot between points. Works for any metric, higher-
or lower-is-better (the integral is over the metric, so the direction does not matter).
"""
import numpy as np
from scipy import interpolate


def _prepare(rate, metric):
  rate = np.asarray(rate, np.float64)
  metric = np.asarray(metric, np.float64)
  if rate.shape != metric.shape or rate.ndim != 1:
    raise ValueError(f"rate and metric must be 1-D and the same length, got {rate.shape} "
                     f"and {metric.shape}")
  keep = np.isfinite(rate) & np.isfinite(metric) & (rate > 0)
  rate, metric = rate[keep], metric[keep]
  if rate.size < 2 or np.unique(metric).size < 2:
    raise ValueError("a curve needs at least 2 points with distinct finite metric values")
  order = np.argsort(metric)
  return np.log(rate[order]), metric[order]


def _integral(log_rate, metric, lo, hi, method):
  if method == "cubic":
    deg = min(3, metric.size - 1)
    p = np.polyint(np.polyfit(metric, log_rate, deg))
    return np.polyval(p, hi) - np.polyval(p, lo)
  if method == "pchip":
    # average duplicate metric values so the interpolant is a function
    m, inv = np.unique(metric, return_inverse=True)
    r = np.bincount(inv, log_rate) / np.bincount(inv)
    return interpolate.PchipInterpolator(m, r).integrate(lo, hi)
  raise ValueError(f"method must be 'cubic' or 'pchip', got {method!r}")


def bd_rate(rate_a, metric_a, rate_b, metric_b, method: str = "pchip") -> float:
  """Percent rate change of curve B against anchor A at equal metric (negative: B saves)."""
  ra, ma = _prepare(rate_a, metric_a)
  rb, mb = _prepare(rate_b, metric_b)
  lo, hi = max(ma[0], mb[0]), min(ma[-1], mb[-1])
  if not hi > lo:
    raise ValueError(f"the curves share no metric interval (A: {ma[0]:g}..{ma[-1]:g}, "
                     f"B: {mb[0]:g}..{mb[-1]:g})")
  diff = (_integral(rb, mb, lo, hi, method) - _integral(ra, ma, lo, hi, method)) / (hi - lo)
  return float((np.exp(diff) - 1.0) * 100.0)
