"""data.source='tfds' on a tiny TFDS dataset built here (ArrayRecord, no TensorFlow, no
network): random access, the training pipeline, the held-out photos, a short training run."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from hvq_jax import images
from hvq_jax.training import data, heldout, train
from tests.conftest import train_config

NAME = "hvq_tiny_photos"


def _photo(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def build(root, n_train=6, n_eval=3, file_format="array_record"):
  """Write the dataset NAME under root with TFDS (PNG files in, no TensorFlow needed);
  returns {split: [uint8 arrays in generation order]}. The builder class is not
  registered: training finds the dataset from its files, as on a machine that has the
  prepared data but not the builder's code."""
  rng = np.random.default_rng(0)
  photos = {"train": [_photo(rng, 64 + 8 * i, 80) for i in range(n_train)],
            "validation": [_photo(rng, 72, 96 - 4 * i) for i in range(n_eval)]}
  pngs = root / "pngs"
  pngs.mkdir(exist_ok=True)

  with tfds.core.registered.skip_registration():
    class HvqTinyPhotos(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")
      # A one-part module name: TFDS 4.9 looks for a builder's checksums file next to its
      # code, and for a class in a package (tests.*) on Python >= 3.9 that path needs
      # the `importlib_resources` backport it does not install.
      __module__ = "hvq_tiny_photos_builder"

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(None, None, 3)), "id": np.int64}))

      def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in photos}

      def _generate_examples(self, split):
        for i, a in enumerate(photos[split]):
          path = pngs / f"{split}_{i}.png"
          Image.fromarray(a).save(path)
          yield i, {"image": str(path), "id": i}   # a path: TFDS copies the PNG bytes

  builder = HvqTinyPhotos(data_dir=str(root / "tfds"), file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return photos


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  return root, build(root)


def _as_set(arrays):
  return {a.tobytes() + bytes(a.shape) for a in arrays}


def test_random_access_source(prepared):
  root, photos = prepared
  src = images.TfdsImages(NAME, "train", str(root / "tfds"))
  assert len(src) == len(photos["train"])
  got = [src[i] for i in range(len(src))]
  assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3 for a in got)
  assert _as_set(got) == _as_set(photos["train"])          # PNG is lossless
  assert len(images.TfdsImages(NAME, "train[:2]", str(root / "tfds"))) == 2


def _config(root, **data_fields):
  c = train_config()
  c.data.source, c.data.tfds_name, c.data.tfds_data_dir = "tfds", NAME, str(root / "tfds")
  c.data.min_scale = 1.0
  for k, v in data_fields.items():
    c.data[k] = v
  return c


def test_training_pipeline_and_held_out_photos(prepared):
  root, photos = prepared
  c = _config(root)
  it = iter(data.train_dataset(c))
  batches = [next(it) for _ in range(4)]
  assert batches[0].shape == (2, 64, 64, 3) and batches[0].dtype == np.uint8
  again = iter(data.train_dataset(c))
  np.testing.assert_array_equal(next(again), batches[0])    # deterministic per seed
  # two processes read disjoint halves of the examples
  crops = {p: {b.tobytes() for b in next(iter(data.train_dataset(c, p, 2)))} for p in (0, 1)}
  assert not crops[0] & crops[1]
  # the held-out photos: the eval split's first eval.num_images, named by index
  c.eval.image_size, c.eval.num_images = 64, 2
  held = heldout.eval_photos(c)
  assert list(held) == [f"{NAME}_00000", f"{NAME}_00001"]
  assert _as_set(held.values()) <= _as_set(photos["validation"])


@pytest.mark.slow
def test_tfds_source_in_worker_processes(prepared):
  """The TFDS source pickled into two grain workers gives the in-process stream."""
  root, _ = prepared
  want = iter(data.train_dataset(_config(root, num_workers=0)))
  it = iter(data.train_dataset(_config(root, num_workers=2)))
  for _ in range(4):
    np.testing.assert_array_equal(next(it), next(want))
  it.close()


def test_short_training_run_on_tfds(prepared, trainer, tmp_path):
  """The same run as the other training tests, on TFDS data: three steps, checkpoints,
  resumable data state (the session's compiled step: data settings are not the model's)."""
  root, _ = prepared
  c = _config(root)
  out = train.train_and_evaluate(c, str(tmp_path), progress=False, trainer=trainer)
  assert int(out["state"]["step"]) == 3
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3] and all(np.isfinite(l["loss"]) for l in lines)
  saved = tmp_path / "checkpoints" / "3" / "data" / "process_0-of-1.json"
  assert json.loads(saved.read_text()) == {"next_index": 3}


def test_missing_or_unusable_datasets_are_named(prepared, tmp_path):
  root, _ = prepared
  with pytest.raises(images.ImageError, match="not_prepared_here.*tfds build"):
    images.TfdsImages("not_prepared_here", "train", str(tmp_path))
  with pytest.raises(images.ImageError, match="split"):
    images.TfdsImages(NAME, "test", str(root / "tfds"))
  with pytest.raises(images.ImageError, match="no image feature 'photo'"):
    images.TfdsImages(NAME, "train", str(root / "tfds"), image_key="photo")
  # a dataset prepared as TFRecord (TFDS's default with TensorFlow) has no random access
  copy = tmp_path / "tfrecord"
  shutil.copytree(root / "tfds", copy)
  info = copy / NAME / "1.0.0" / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
  with pytest.raises(images.ImageError, match="tfrecord.*--file_format=array_record"):
    images.TfdsImages(NAME, "train", str(copy))
