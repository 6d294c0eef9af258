import numpy as np
import jax.numpy as jnp
import pytest

from hvq_jax.nn import granularity


def numpy_patch_entropy(x, patch, bins=32):
  gray = ((x + 1) / 2) @ np.array([0.299, 0.587, 0.114])
  b, h, w = gray.shape
  out = np.zeros((b, h // patch, w // patch))
  centres = (np.arange(bins) + 0.5) / bins
  for i in range(b):
    for r in range(h // patch):
      for c in range(w // patch):
        v = gray[i, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].reshape(-1, 1)
        k = np.exp(-0.5 * ((v - centres) * bins) ** 2)
        hist = (k / k.sum(1, keepdims=True)).mean(0)
        out[i, r, c] = -(hist * np.log(np.maximum(hist, 1e-12))).sum()
  return out


def test_patch_entropy_matches_numpy():
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 48, 3))
  got = granularity.patch_entropy(jnp.asarray(x, jnp.float32), 16)
  np.testing.assert_allclose(np.asarray(got), numpy_patch_entropy(x, 16), rtol=1e-4)


@pytest.mark.parametrize("ratios", [(0.1, 0.4, 0.5), (0.3, 0.3, 0.4), (1, 0, 0), (0, 0, 1), (0.5, 0.5, 0)])
def test_ratios_respected_within_one_patch(ratios):
  scores = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 5)), jnp.float32)
  gmap = np.asarray(granularity.assign(scores, jnp.asarray(ratios, jnp.float32)))
  n = 35
  for g in range(3):
    counts = (gmap == g).sum(axis=(1, 2))
    assert np.all(np.abs(counts - ratios[g] * n) <= 1), (g, counts)


def test_densest_patches_go_fine():
  rng = np.random.default_rng(2)
  x = np.zeros((1, 64, 64, 3), np.float32)          # flat gray everywhere
  x[0, :16, 16:32] = rng.uniform(-1, 1, (16, 16, 1))  # gray noise patch: (0, 1)
  x[0, 32:48, :16] = np.linspace(-1, 1, 16)[:, None, None]  # one gradient patch: (2, 0)
  gmap = np.asarray(granularity.granularity_map(jnp.asarray(x), jnp.array([14 / 16, 1 / 16, 1 / 16]), 16))
  assert gmap[0, 0, 1] == granularity.FINE
  assert gmap[0, 2, 0] == granularity.MEDIUM
  assert (gmap == granularity.COARSE).sum() == 14


def test_map_bits_is_multinomial_code_length():
  gmap = jnp.asarray(np.array([[[0, 0], [1, 2]]]))
  bits = float(granularity.map_bits(gmap, jnp.array([0.5, 0.25, 0.25]))[0])
  assert bits == pytest.approx(2 * 1 + 2 + 2)
