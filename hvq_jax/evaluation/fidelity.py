"""FID and KID of decoded images as image-compression papers compute them (FID/256).

A test set has far fewer images than FID needs, so HiFiC (Mentzer et al. 2020) and
MS-ILLM (Muckley et al. 2023, NeuralCompression's `update_patch_fid`) cut every
full-size image into non-overlapping 256x256 patches from the top-left corner, and,
when the image is at least 1.5 x 256 on both sides, a second grid shifted by 128
pixels; FID and KID are then computed over the patches of the whole set, originals
against reconstructions. Features: the FID Inception's 2048-d pool (`nn/inception.py`).
FID: the Fréchet distance of the two Gaussians (mean and unbiased covariance).
KID: torch-fidelity's estimator (100 random subsets of 1000 patches per side, seed
2020, cubic polynomial kernel, unbiased MMD^2); with fewer patches the subset size is
the patch count, and the output says so. Few patches bias FID upwards: the patch
count is reported next to every figure.
"""
from typing import Dict, Hashable, List, Optional, Tuple

import numpy as np

PATCH = 256
SCHEME = ("FID/256 (HiFiC, MS-ILLM): non-overlapping 256x256 patches of every full-size "
          "image, plus a grid shifted by 128 px where the image is >= 384 px on both sides; "
          "Inception-v3 (TF 2015-12-05) pool features, torch-fidelity's FID and KID "
          "(100 subsets, seed 2020)")
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020


def patches(img: np.ndarray, size: int = PATCH) -> np.ndarray:
  """uint8 [H, W, 3] -> [N, size, size, 3]: the grid from (0, 0), then the grid from
  (size/2, size/2) when H and W are both >= 1.5 * size; row-major within each grid."""
  img = np.asarray(img)

  def grid(a):
    nh, nw = a.shape[0] // size, a.shape[1] // size
    a = a[:nh * size, :nw * size].reshape(nh, size, nw, size, a.shape[2])
    return a.transpose(0, 2, 1, 3, 4).reshape(nh * nw, size, size, a.shape[-1])

  out = [grid(img)]
  if img.shape[0] >= 1.5 * size and img.shape[1] >= 1.5 * size:
    out.append(grid(img[size // 2:, size // 2:]))
  return np.concatenate(out)


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (unbiased, float64) of [N, D] features."""
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians.

  tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1 S2 (torch-fidelity
  takes them from a general eigensolver); here from the symmetric A S2 A, A = S1^(1/2),
  which has the same eigenvalues and is four times faster at 2048-d. Eigenvalues below 0
  (round-off) count as 0, as the real part of their complex root does there."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  w, v = np.linalg.eigh(s1)
  a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  ev = np.linalg.eigvalsh(a @ s2 @ a)
  diff = mu1 - mu2
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
  """FID of two [N, D] feature sets. With fewer samples than dimensions (a test set's
  patches in 2048-d) the covariances have rank < N and tr (S1 S2)^(1/2) is the nuclear
  norm of the N1 x N2 matrix X1 X2^T / sqrt((N1-1)(N2-1)) of centred features (the
  eigenvalues of S1 S2 = X1^T X1 X2^T X2 / .. are the squared singular values of
  X1 X2^T / ..): exact, and seconds instead of a minute per setting."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if min(len(f1), len(f2)) > f1.shape[1]:
    return frechet_distance(*statistics(f1), *statistics(f2))
  x1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
  x2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
  diff = f1.mean(0) - f2.mean(0)
  nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
  return float(diff.dot(diff) + (x1 * x1).sum() + (x2 * x2).sum() - 2 * nuclear)


def _poly_kernel(x, y):
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx, kxy, kyy):
  m = kxx.shape[0]
  return ((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
          - 2 * kxy.sum() / (m * m))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> Dict[str, float]:
  """KID mean and std over random subsets (torch-fidelity's draws: one RandomState, per
  subset `choice` without replacement from the real then the fake features)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  m = min(subset_size, len(real), len(fake))
  if m < 2:
    raise ValueError(f"KID needs at least 2 patches per side, got {len(real)} and {len(fake)}")
  rng = np.random.RandomState(seed)
  vals = np.zeros(subsets)
  for i in range(subsets):
    a = real[rng.choice(len(real), m, replace=False)]
    b = fake[rng.choice(len(fake), m, replace=False)]
    vals[i] = _mmd2_unbiased(_poly_kernel(a, a), _poly_kernel(a, b), _poly_kernel(b, b))
  return dict(kid=float(vals.mean()), kid_std=float(vals.std()), kid_subset_size=m)


class PatchFidelity:
  """Collects Inception features of the patches of originals (once per image) and of
  each (method, setting)'s reconstructions, then FID/KID per (method, setting)."""

  def __init__(self, params, batch: int = 16):
    import jax
    from hvq_jax.nn import inception
    module = inception.InceptionV3FID()
    self._fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
    self._params, self._batch = params, batch
    self._real: Dict[str, np.ndarray] = {}
    self._fake: Dict[Hashable, Dict[str, np.ndarray]] = {}

  @classmethod
  def create(cls, weights: Optional[str] = None):
    """(PatchFidelity, None), or (None, reason) when the Inception weights are missing."""
    from hvq_jax.nn import inception
    try:
      return cls(inception.load_params(weights)), None
    except inception.WeightsError as e:
      return None, str(e)

  def features(self, imgs: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 2048], in batches padded to a power of two (at
    most `batch`), so varying patch counts compile a handful of programs, not one each."""
    out = []
    for i in range(0, len(imgs), self._batch):
      chunk = imgs[i:i + self._batch]
      n = len(chunk)
      size = min(self._batch, 1 << (n - 1).bit_length())
      if size > n:
        chunk = np.concatenate([chunk, np.zeros((size - n,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self._fn(self._params, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)

  def add(self, key: Hashable, name: str, original: np.ndarray, decoded: np.ndarray) -> None:
    if name not in self._real:
      self._real[name] = self.features(patches(original))
    if np.shape(original) != np.shape(decoded):
      raise ValueError(f"{name}: decoded shape {np.shape(decoded)} != original {np.shape(original)}")
    self._fake.setdefault(key, {})[name] = self.features(patches(decoded))

  def feature_sets(self, key: Hashable) -> Tuple[np.ndarray, np.ndarray]:
    """(original, decoded) patch features of `key`, images in the order they were added."""
    names = list(self._fake[key])
    return (np.concatenate([self._real[n] for n in names]),
            np.concatenate([self._fake[key][n] for n in names]))

  def results(self) -> Dict[Hashable, Dict]:
    """{key: {fid, kid, kid_std, kid_subset_size, patches, images}}; fid/kid None (with
    `reason`) when fewer than 2 patches exist (images smaller than 256x256)."""
    out = {}
    for key, per_image in self._fake.items():
      real, fake = self.feature_sets(key)
      r = dict(patches=len(real), images=len(per_image))
      if len(real) < 2:
        r.update(fid=None, kid=None, kid_std=None, kid_subset_size=None,
                 reason=f"{len(real)} patch(es) of 256x256: images too small for FID/256")
      else:
        r["fid"] = frechet_distance_features(real, fake)
        r.update(kid(real, fake))
      out[key] = r
    return out


def summary_rows(results: Dict[Tuple[str, str], Dict]) -> List[Dict]:
  """Flat rows (method, setting, fid, kid, ...) for `fid_kid.csv`."""
  return [dict(method=m, setting=s, **{k: v for k, v in r.items() if k != "reason"})
          for (m, s), r in results.items()]
