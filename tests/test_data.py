"""Image conversion rules and the grain pipeline's determinism, resumability, sharding."""
import os

import numpy as np
import pytest
from PIL import Image

from hvq_jax.configs import tiny_cpu
from hvq_jax.training import data
from hvq_jax import images


def test_conversion_rules():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(images.to_rgb_uint8(gray), np.stack([gray] * 3, -1))
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = [[255, 0], [128, 64]]
  a = rgba[..., 3:].astype(np.float64) / 255
  want = np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
  np.testing.assert_array_equal(images.to_rgb_uint8(rgba), want)
  sixteen = np.array([[0, 257, 65535, 1000]], np.uint16)
  np.testing.assert_array_equal(images.to_rgb_uint8(sixteen)[..., 0], [[0, 1, 255, 4]])
  with pytest.raises(images.ImageError, match="shape"):
    images.to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


def test_read_image_files(tmp_path):
  p16 = tmp_path / "a.png"
  Image.fromarray(np.full((5, 6), 65535, np.uint16)).save(p16)
  assert images.read_image(str(p16)).shape == (5, 6, 3)
  assert images.read_image(str(p16)).max() == 255
  bad = tmp_path / "b.png"
  bad.write_bytes(b"not an image")
  with pytest.raises(images.ImageError, match="b.png"):
    images.read_image(str(bad))
  with pytest.raises(images.ImageError, match="no such file"):
    images.read_image(str(tmp_path / "missing.png"))


def _config(seed=0):
  c = tiny_cpu.get_config()
  c.seed = seed
  c.train.batch_size = 4
  c.image_size = 64
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_deterministic_and_resumable():
  a = _take(iter(data.train_dataset(_config())), 3)
  it = iter(data.train_dataset(_config()))
  b = _take(it, 2)
  state = it.get_state()
  rest = _take(it, 1)
  for x, y in zip(a, b + rest):
    np.testing.assert_array_equal(x, y)
  assert a[0].shape == (4, 64, 64, 3) and a[0].dtype == np.uint8
  it2 = iter(data.train_dataset(_config()))
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2), rest[0])
  other = next(iter(data.train_dataset(_config(seed=1))))
  assert not np.array_equal(other, a[0])


def test_process_shards_are_disjoint(tmp_path):
  for i in range(4):
    Image.fromarray(np.full((80, 80, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
  c = _config()
  c.data.source, c.data.train_dir, c.data.min_scale = "folder", str(tmp_path), 1.0
  c.train.batch_size = 2
  seen = []
  for p in range(2):
    it = iter(data.train_dataset(c, process_index=p, process_count=2))
    vals = {int(v) for _ in range(4) for v in next(it)[:, 0, 0, 0]}
    seen.append(vals)
  assert seen[0] == {0, 120} and seen[1] == {60, 180}


def test_bundled_split_is_fixed_and_disjoint():
  assert not set(images.TRAIN_PHOTOS) & set(images.HELDOUT_PHOTOS)
  photos = images.bundled_photos("heldout")
  assert [p.shape for p in photos.values()] == [(400, 600, 3), (300, 451, 3), (427, 640, 3)]


def test_color_jitter_against_numpy_yiq():
  """Hue rotation keeps luma (Y of YIQ) and turns the chroma plane by the drawn angle;
  saturation scales it; permutation permutes channels; same seed, same output."""
  from hvq_jax.training.data import ColorJitter
  rng = np.random.default_rng(0)
  img = rng.integers(30, 220, (16, 16, 3)).astype(np.uint8)
  yiq = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263],
                  [0.211456, -0.522591, 0.311135]])
  hue = ColorJitter(hue_deg=90.0)
  out = hue.random_map(img, np.random.default_rng(5))
  theta = np.deg2rad(np.random.default_rng(5).uniform(-90, 90))
  a, b = img.reshape(-1, 3).astype(float) @ yiq.T, out.reshape(-1, 3).astype(float) @ yiq.T
  ok = (out.reshape(-1, 3) > 0).all(1) & (out.reshape(-1, 3) < 255).all(1)   # not clipped
  np.testing.assert_allclose(b[ok, 0], a[ok, 0], atol=1.0)
  rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  np.testing.assert_allclose(b[ok, 1:], a[ok, 1:] @ rot.T, atol=1.5)
  sat = ColorJitter(saturation=0.5).random_map(img, np.random.default_rng(1))
  s = np.random.default_rng(1).uniform(0.5, 1.5)
  c = sat.reshape(-1, 3).astype(float) @ yiq.T
  ok = (sat.reshape(-1, 3) > 0).all(1) & (sat.reshape(-1, 3) < 255).all(1)
  np.testing.assert_allclose(c[ok, 1:], s * a[ok, 1:], atol=1.5)
  perm = ColorJitter(permute=1.0).random_map(img, np.random.default_rng(2))
  order = np.random.default_rng(2)
  order.random()
  np.testing.assert_array_equal(perm, img[..., order.permutation(3)])
  np.testing.assert_array_equal(hue.random_map(img, np.random.default_rng(5)), out)
  np.testing.assert_array_equal(ColorJitter().random_map(img, np.random.default_rng(0)), img)
