"""FID/256 machinery against independent references: the patch grid against torch's
unfold as NeuralCompression's `update_patch_fid` cuts it, the Fréchet distance against
scipy.linalg.sqrtm, KID against a plain numpy formula and torch-fidelity's estimator."""
import numpy as np
import pytest
from scipy import linalg

from hvq_jax.evaluation import fidelity


def _scipy_fd(f1, f2):
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  covmean = linalg.sqrtm(s1 @ s2).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("hw,count", [((512, 768), 8), ((768, 512), 8), ((300, 700), 2),
                                      ((400, 400), 2), ((383, 600), 2), ((255, 900), 0),
                                      ((1365, 2048), 40 + 28)])
def test_patch_counts(hw, count):
  img = np.zeros((*hw, 3), np.uint8)
  assert len(fidelity.patches(img)) == count


def test_patches_match_unfold():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (520, 790, 3), dtype=np.uint8)
  t = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].float()
  cut = lambda u: (torch.nn.functional.unfold(u, 256, stride=256).permute(0, 2, 1)
                   .reshape(-1, 3, 256, 256))
  want = torch.cat([cut(t), cut(t[:, :, 128:, 128:])]).numpy().transpose(0, 2, 3, 1)
  got = fidelity.patches(img)
  assert got.dtype == np.uint8 and got.shape == (6 + 2, 256, 256, 3)
  np.testing.assert_array_equal(got, want.astype(np.uint8))


@pytest.mark.parametrize("n1,n2,d", [(300, 250, 16), (40, 30, 64), (500, 500, 8)])
def test_frechet_distance_against_scipy(n1, n2, d):
  rng = np.random.default_rng(n1)
  mix = rng.normal(size=(d, d))
  f1 = rng.normal(size=(n1, d)) @ mix
  f2 = rng.normal(size=(n2, d)) @ (mix + 0.3 * rng.normal(size=(d, d))) + 0.5
  want = _scipy_fd(f1, f2)
  assert fidelity.frechet_distance(*fidelity.statistics(f1), *fidelity.statistics(f2)) == \
      pytest.approx(want, rel=1e-6)
  assert fidelity.frechet_distance_features(f1, f2) == pytest.approx(want, rel=1e-6)  # n < d: low rank
  assert fidelity.frechet_distance_features(f1, f1) == pytest.approx(0.0, abs=1e-6 * np.trace(np.cov(f1.T)))


def _numpy_kid(real, fake, subsets, m, seed):
  """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, over torch-fidelity's subsets."""
  rng = np.random.RandomState(seed)
  d = real.shape[1]
  k = lambda x, y: (np.dot(x, y) / d + 1.0) ** 3
  vals = []
  for _ in range(subsets):
    x = real[rng.choice(len(real), m, replace=False)]
    y = fake[rng.choice(len(fake), m, replace=False)]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    vals.append(xx + yy - 2 * xy)
  return np.mean(vals), np.std(vals)


def test_kid_against_numpy_formula():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(40, 12))
  fake = rng.normal(size=(35, 12)) * 1.2 + 0.1
  got = fidelity.kid(real, fake, subsets=5, subset_size=20, seed=3)
  mean, std = _numpy_kid(real, fake, 5, 20, 3)
  assert got["kid"] == pytest.approx(mean, rel=1e-9)
  assert got["kid_std"] == pytest.approx(std, rel=1e-9)
  assert got["kid_subset_size"] == 20
  small = fidelity.kid(real[:8], fake, subsets=3)            # subset size capped at the patch count
  assert small["kid_subset_size"] == 8
  assert small["kid"] == pytest.approx(_numpy_kid(real[:8], fake, 3, 8, fidelity.KID_SEED)[0], rel=1e-9)


def test_kid_against_torch_fidelity():
  torch = pytest.importorskip("torch")
  from tests import torch_fidelity_ref
  kid_mod = torch_fidelity_ref.modules()[2]
  rng = np.random.default_rng(2)
  real = rng.normal(size=(120, 32))
  fake = rng.normal(size=(110, 32)) + 0.2
  ref = kid_mod.kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(fake),
                                       kid_subset_size=50, verbose=False)
  got = fidelity.kid(real, fake, subset_size=50)              # default 100 subsets, seed 2020
  assert got["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
  assert got["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)


def test_results_need_two_patches():
  class Fake(fidelity.PatchFidelity):
    def __init__(self):
      self._real, self._fake = {}, {}
    def features(self, imgs):
      return np.asarray(imgs, np.float64).reshape(len(imgs), 256 * 256 * 3)[:, :8]
  f = Fake()
  f.add(("m", "s"), "small", np.zeros((100, 300, 3), np.uint8), np.zeros((100, 300, 3), np.uint8))
  r = f.results()[("m", "s")]
  assert r["fid"] is None and r["patches"] == 0 and "too small" in r["reason"]
  with pytest.raises(ValueError, match="decoded shape"):
    f.add(("m", "s"), "x", np.zeros((256, 256, 3), np.uint8), np.zeros((256, 255, 3), np.uint8))
