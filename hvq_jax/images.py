"""Image I/O and the bundled photos (scikit-image, scikit-learn): no downloads.

One conversion rule for every input: grayscale -> RGB by repetition, RGBA/LA -> RGB
composited on white, palette/CMYK/other modes through Pillow's RGB conversion,
16-bit -> 8-bit by rounding x / 257. Images are uint8 [H, W, 3] at the boundary.
"""
import os
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Fixed split of the bundled photos: the held-out ones never feed training.
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                "stereo_motorcycle", "camera", "coins", "clock", "china.jpg")
HELDOUT_PHOTOS = ("coffee", "chelsea", "flower.jpg")


class ImageError(ValueError):
  """An input image that cannot be read or converted; the message names the file."""


def to_rgb_uint8(a: np.ndarray, name: str = "image") -> np.ndarray:
  """Any 2-D/3-D image array (bool, uint8, uint16, float in [0,1]) -> uint8 [H, W, 3]."""
  a = np.asarray(a)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
    raise ImageError(f"{name}: expected an [H, W], [H, W, 3] or [H, W, 4] image, "
                     f"got shape {a.shape}")
  if a.dtype == np.bool_:
    a = a.astype(np.uint8) * 255
  elif a.dtype == np.uint16:
    a = np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
  elif np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)):
      raise ImageError(f"{name}: image has non-finite values")
    a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
  elif a.dtype != np.uint8:
    raise ImageError(f"{name}: unsupported dtype {a.dtype}")
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  elif a.shape[-1] in (2, 4):  # gray+alpha or RGBA: composite on white
    alpha = a[..., -1:].astype(np.float32) / 255.0
    color = a[..., :-1].astype(np.float32)
    if color.shape[-1] == 1:
      color = np.repeat(color, 3, axis=-1)
    a = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
  if min(a.shape[:2]) < 1:
    raise ImageError(f"{name}: empty image {a.shape}")
  return np.ascontiguousarray(a)


def read_image(path: str) -> np.ndarray:
  """Read a PNG/JPEG/WebP/... file as uint8 [H, W, 3] with the conversion rule above."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.uint16 if im.mode.startswith("I;16") else np.int64)
        if a.dtype == np.int64:
          a = np.clip(a, 0, 65535).astype(np.uint16)
        return to_rgb_uint8(a, path)
      if im.mode not in ("L", "LA", "RGB", "RGBA", "1"):
        im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
      return to_rgb_uint8(np.asarray(im), path)
  except ImageError:
    raise
  except FileNotFoundError:
    raise ImageError(f"{path}: no such file") from None
  except Exception as e:  # PIL raises many types for undecodable files
    raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def list_images(folder: str) -> List[str]:
  if not os.path.isdir(folder):
    raise ImageError(f"{folder}: not a folder")
  paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ImageError(f"{folder}: no images with extensions {IMAGE_EXTENSIONS}")
  return paths


def bundled_photo(name: str) -> np.ndarray:
  """A real photo shipped with scikit-image (by function name) or scikit-learn (*.jpg)."""
  if name.endswith(".jpg"):
    import sklearn.datasets
    path = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)
    return read_image(path)
  import skimage.data
  a = getattr(skimage.data, name)()
  if isinstance(a, tuple):  # stereo_motorcycle returns (left, right, disparity)
    a = a[0]
  return to_rgb_uint8(a, name)


def bundled_photos(split: str) -> Dict[str, np.ndarray]:
  names = {"train": TRAIN_PHOTOS, "heldout": HELDOUT_PHOTOS}[split]
  return {n: bundled_photo(n) for n in names}


# ---- random-access image sources (grain training data, evaluation sets) -------------------
class InMemoryImages:
  """Random-access source over a list of uint8 [H, W, 3] arrays."""

  def __init__(self, arrays: Sequence[np.ndarray]):
    self._arrays = list(arrays)

  def __len__(self):
    return len(self._arrays)

  def __getitem__(self, i):
    return self._arrays[i]


class ImageFolder:
  """Random-access source over a folder of images, decoded on access."""

  def __init__(self, folder: str):
    self._paths = list_images(folder)

  def __len__(self):
    return len(self._paths)

  def __getitem__(self, i):
    return read_image(self._paths[i])


class TfdsImages:
  """`tfds.data_source(name, split, data_dir)` (ArrayRecord, random access) -> RGB uint8."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str = "image"):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ImportError("data.source='tfds' needs tensorflow-datasets: "
                        "pip install 'hvq_jax[tfds]'") from None
    self._src = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self._key = image_key

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return to_rgb_uint8(np.asarray(self._src[i][self._key]), f"tfds[{i}]")
