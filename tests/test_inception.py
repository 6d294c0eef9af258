"""The FID Inception against torch-fidelity's FeatureExtractorInceptionV3 on the same
(random) weights, its TF1 bilinear resize, the weights lookup and FID/256 end to end."""
import os

import jax
import numpy as np
import pytest

from hvq_jax import images
from hvq_jax.nn import inception
from tests import torch_fidelity_ref

torch = pytest.importorskip("torch", reason="torch-fidelity is PyTorch")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / inception.FILE_NAMES[0])
  model = torch_fidelity_ref.random_inception(path)
  return path, model


def _to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("hw", [(256, 256), (300, 280), (64, 80), (299, 299), (500, 301)])
def test_resize_matches_tf1_compat(hw):
  interp = torch_fidelity_ref.modules()[1]
  rng = np.random.default_rng(hw[0])
  x = rng.integers(0, 256, (2, *hw, 3)).astype(np.float32)
  want = interp.interpolate_bilinear_2d_like_tensorflow1x(
      _to_torch(x), size=(299, 299), align_corners=False).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(inception.resize_like_tf1(x))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)   # 0..255 scale: ~1 ulp of 255


def test_features_match_torch_fidelity(weights):
  path, model = weights
  params = inception.load_params(path)
  photos = [images.bundled_photo("astronaut")[:256, :256], images.bundled_photo("coffee")[:256, 100:356],
            images.bundled_photo("chelsea")[:256, :256]]
  for batch in (np.stack(photos), images.bundled_photo("astronaut")[None, 50:349, 60:359]):
    with torch.no_grad():
      want = model(_to_torch(batch))[0].numpy()
    got = np.asarray(jax.jit(inception.InceptionV3FID().apply)({"params": params}, batch))
    assert got.shape == (len(batch), 2048)
    assert np.abs(want).mean() > 1e-2                      # features not degenerate
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_legacy_torch_file_loads_the_same(weights, tmp_path):
  path, model = weights
  legacy = str(tmp_path / "legacy.pth")
  torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
  a, b = inception.load_params(path), inception.load_params(legacy)

  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
  monkeypatch.delenv(inception.ENV, raising=False)
  monkeypatch.setattr(inception, "_hub_dirs", lambda: [str(tmp_path)])
  with pytest.raises(inception.WeightsError) as e:
    inception.find_weights()
  msg = str(e.value)
  assert "\n" not in msg
  for part in ("pt_inception-2015-12-05-6726825d.pth", "github.com/mseitzer/pytorch-fid/releases",
               "--inception-weights", inception.ENV):
    assert part in msg
  with pytest.raises(inception.WeightsError, match="no such file"):
    inception.find_weights(str(tmp_path / "elsewhere.pth"))
  (tmp_path / inception.FILE_NAMES[1]).write_bytes(b"")      # torch-fidelity's name, in hub's cache
  assert inception.find_weights() == str(tmp_path / inception.FILE_NAMES[1])


def test_wrong_file_is_named(tmp_path):
  torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "w.pth")
  with pytest.raises(inception.WeightsError, match="not the FID Inception weights"):
    inception.load_params(str(tmp_path / "w.pth"))


def test_patch_fid_end_to_end(weights):
  """FID/256 and KID/256 of two photos against their JPEG versions: our patches and
  features against NeuralCompression-style patches (torch unfold) through torch-fidelity's
  extractor, and our KID against torch-fidelity's `kid_features_to_metric` on those."""
  import io
  from PIL import Image
  from hvq_jax.evaluation import fidelity
  path, model = weights
  originals = {"astronaut": images.bundled_photo("astronaut")[:384, :512],
               "rocket": images.bundled_photo("rocket")[:384, :512]}
  def jpeg(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=5)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  pf = fidelity.PatchFidelity(inception.load_params(path))
  for n, a in originals.items():
    pf.add(("jpeg", "q=5"), n, a, jpeg(a))
  r = pf.results()[("jpeg", "q=5")]
  assert r["patches"] == 6 and r["images"] == 2    # 2 + 1 shifted per image

  def unfold(a):
    t = _to_torch(a[None]).float()
    cut = lambda u: (torch.nn.functional.unfold(u, 256, stride=256).permute(0, 2, 1)
                     .reshape(-1, 3, 256, 256))
    return torch.cat([cut(t), cut(t[:, :, 128:, 128:])]).to(torch.uint8)
  with torch.no_grad():
    real = np.concatenate([model(unfold(a))[0].numpy() for a in originals.values()])
    fake = np.concatenate([model(unfold(jpeg(a)))[0].numpy() for a in originals.values()])
  ours_real, ours_fake = pf.feature_sets(("jpeg", "q=5"))
  for got, want in ((ours_real, real), (ours_fake, fake)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert r["fid"] == pytest.approx(fidelity.frechet_distance_features(real, fake), rel=1e-4)
  kid_ref = torch_fidelity_ref.modules()[2].kid_features_to_metric(
      torch.from_numpy(real).double(), torch.from_numpy(fake).double(), kid_subset_size=6,
      verbose=False)
  assert r["kid_subset_size"] == 6
  # every 6-of-6 subset is the whole set: the std is float round-off of kernels ~1e10
  # (random weights give large features), so only the mean is compared here
  assert r["kid"] == pytest.approx(kid_ref["kernel_inception_distance_mean"], rel=1e-3)
