"""Image I/O and the bundled photos (scikit-image, scikit-learn): no downloads.

One conversion rule for every input, by what the data declares, never by guessing:
  - uint8: 8-bit; bool: 0 / 255.
  - uint16: 16-bit, to 8-bit by rounding x / 257 (16-bit PNG/TIFF/PPM files keep their
    low byte: Pillow's own 8-bit reading of 16-bit colour files truncates, so read_image
    decodes both bytes).
  - other integer dtypes (int32 from Pillow's mode "I", int64 from Python lists): 8-bit
    values; refused unless every value lies in 0..255.
  - float: values in [0, 1]; refused when any value lies outside [0, 1] by more than half
    an 8-bit step (a 0-255 float array would otherwise become white) or is not finite.
  - grayscale -> RGB by repetition; RGBA / LA and a PNG transparency colour -> RGB
    composited on white; palette / CMYK / other modes through Pillow's RGB conversion.
Images are uint8 [H, W, 3] at the boundary.
"""
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Fixed split of the bundled photos: the held-out ones never feed training.
# The training photos: the 7 colour photos the installed packages ship (less the held-out
# ones), 3 grayscale ones, and the package's own demo photos (hvq_jax/photos: greens,
# blues and earth tones from the photo corpus's training split, docs/corpus.md). The other
# real grayscale photos (EXTRA_GRAY_PHOTOS) cost rate, PSNR and colour when added
# (results/FINDINGS.md, "Colour").
TRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                "stereo_motorcycle", "camera", "coins", "clock", "china.jpg")
DEMO_PHOTOS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "photos")
EXTRA_GRAY_PHOTOS = ("brick", "grass", "gravel", "moon", "cell", "page", "text")
HELDOUT_PHOTOS = ("coffee", "chelsea", "flower.jpg")

_FLOAT_TOLERANCE = 0.5 / 255   # a float within half an 8-bit step of [0, 1] rounds into it


class ImageError(ValueError):
  """An input image that cannot be read or converted; the message names the file."""


def _range(a: np.ndarray) -> str:
  return f"[{a.min():.6g}, {a.max():.6g}]"


def _unit_float(a: np.ndarray, name: str) -> np.ndarray:
  """Any accepted dtype -> float64 in [0, 1] (uint8 is handled by the caller)."""
  if a.dtype == np.bool_:
    return a.astype(np.float64)
  if a.dtype == np.uint16:
    return a.astype(np.float64) / 65535.0
  if np.issubdtype(a.dtype, np.floating):
    if not np.all(np.isfinite(a)):
      raise ImageError(f"{name}: image has non-finite values (NaN or Inf)")
    if a.min() < -_FLOAT_TOLERANCE or a.max() > 1.0 + _FLOAT_TOLERANCE:
      raise ImageError(
          f"{name}: float image with values in {_range(a)}; float images must lie in "
          f"[0, 1] (for 0-255 data pass a uint8 array or divide by 255; clip overshoot)")
    return np.clip(a.astype(np.float64), 0.0, 1.0)
  if np.issubdtype(a.dtype, np.integer):
    if a.min() < 0 or a.max() > 255:
      raise ImageError(
          f"{name}: {a.dtype} image with values in {_range(a)}; integer images other than "
          f"uint16 are read as 8-bit and must lie in 0..255 (pass uint16 for 16-bit data)")
    return a.astype(np.float64) / 255.0
  raise ImageError(f"{name}: unsupported dtype {a.dtype}")


def to_rgb_uint8(a: np.ndarray, name: str = "image") -> np.ndarray:
  """Any 2-D/3-D image array -> uint8 [H, W, 3] by the rule in the module docstring."""
  a = np.asarray(a)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
    raise ImageError(f"{name}: expected an [H, W], [H, W, 3] or [H, W, 4] image, "
                     f"got shape {a.shape}")
  if min(a.shape[:2]) < 1:
    raise ImageError(f"{name}: empty image {a.shape}")
  if a.dtype == np.uint8:
    if a.ndim == 2:
      a = np.repeat(a[..., None], 3, axis=-1)
    elif a.shape[-1] in (2, 4):  # gray+alpha or RGBA: composite on white
      alpha = a[..., -1:].astype(np.float32) / 255.0
      color = a[..., :-1].astype(np.float32)
      if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
      a = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a)
  f = _unit_float(a, name)   # other depths: composite at full precision, round once
  if f.ndim == 2:
    f = f[..., None]
  if f.shape[-1] in (2, 4):
    alpha = f[..., -1:]
    f = f[..., :-1] * alpha + (1.0 - alpha)
  if f.shape[-1] == 1:
    f = np.repeat(f, 3, axis=-1)
  return np.ascontiguousarray(np.round(f * 255.0).astype(np.uint8))


# ---- files --------------------------------------------------------------------------------
_SWAP = {";16B": ";16L", ";16L": ";16B", ";16N": ";16B" if np.little_endian else ";16L"}


def _rawmode(args):
  return args if isinstance(args, str) else args[0]


def _with_rawmode(args, rawmode):
  return rawmode if isinstance(args, str) else (rawmode,) + tuple(args[1:])


def _decode_tiles(path: str, rawmode_of) -> np.ndarray:
  """Decode `path` again with each tile's rawmode replaced (`rawmode_of(old) -> new`)."""
  with Image.open(path) as im:
    im.tile = [ImageFile._Tile(t.codec_name, t.extents, t.offset,
                               _with_rawmode(t.args, rawmode_of(_rawmode(t.args))))
               for t in im.tile]
    im.load()
    return np.asarray(im)


def _sixteen_bit_colour(path: str, im) -> Optional[np.ndarray]:
  """uint16 [H, W, C] of a 16-bit-per-sample colour file that Pillow reads as 8-bit RGB/RGBA
  by dropping each sample's low byte; None for any other file.

  Pillow's decoders take each sample's high byte; decoding again with the byte order
  swapped gives the low bytes (16-bit gray+alpha PNG: its 4 bytes a pixel read as 8-bit
  RGBA). Both decodes run the file's own unfiltering, so interlaced PNGs work too."""
  if im.mode not in ("RGB", "RGBA") or not im.tile:
    return None
  raws = {_rawmode(t.args) for t in im.tile}
  if raws == {"LA;16B"}:
    b = _decode_tiles(path, lambda r: "RGBA").astype(np.uint16)
    return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], -1)
  if not all(r[-4:] in _SWAP and r[:-4] == im.mode for r in raws):
    if any(";16" in r for r in raws):
      raise ImageError(f"{path}: 16-bit {im.mode} samples in a layout this reader cannot "
                       f"decode at full precision ({sorted(raws)}); save it as 8-bit")
    return None
  high = _decode_tiles(path, lambda r: r).astype(np.uint16)
  low = _decode_tiles(path, lambda r: r[:-4] + _SWAP[r[-4:]]).astype(np.uint16)
  return high << 8 | low


def _transparent(a: np.ndarray, colour) -> np.ndarray:
  """Gray/RGB samples + a PNG tRNS colour -> the same with an alpha channel."""
  a = a[..., None] if a.ndim == 2 else a
  key = np.asarray(colour if isinstance(colour, tuple) else (colour,), a.dtype)
  opaque = ~np.all(a == key.reshape((1,) * (a.ndim - 1) + (-1,)), axis=-1)
  top = np.iinfo(a.dtype).max if a.dtype.kind in "ui" else 1.0
  return np.concatenate([a, (opaque * top).astype(a.dtype)[..., None]], -1)


def _declared_16_bit(im) -> bool:
  """Pillow's mode "I" (32-bit int) holds 16-bit samples for PNG and PPM/PGM, and for TIFF
  when its BitsPerSample says 16; elsewhere its depth is not declared."""
  if im.format in ("PNG", "PPM"):
    return True
  if im.format == "TIFF":
    bits = getattr(im, "tag_v2", {}).get(258)
    return tuple(np.atleast_1d(bits)) == (16,) if bits is not None else False
  return False


def read_image(path: str) -> np.ndarray:
  """Read a PNG/JPEG/WebP/TIFF/... file as uint8 [H, W, 3] with the conversion rule above."""
  try:
    with Image.open(path) as im:
      transparency = im.info.get("transparency")
      wide = _sixteen_bit_colour(path, im)
      if wide is not None:
        if transparency is not None and wide.shape[-1] == 3:
          wide = _transparent(wide, transparency)
        return to_rgb_uint8(wide, path)
      im.load()
      if im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint16)
      elif im.mode == "I":
        a = np.asarray(im)
        if _declared_16_bit(im):
          if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{path}: 16-bit image with samples in {_range(a)}")
          a = a.astype(np.uint16)
      elif im.mode == "F":
        a = np.asarray(im)
      else:
        if im.mode not in ("L", "LA", "RGB", "RGBA", "1") or (
            transparency is not None and im.mode in ("L", "RGB")):
          im = im.convert("RGBA" if "A" in im.mode or transparency is not None else "RGB")
        return to_rgb_uint8(np.asarray(im), path)
      if transparency is not None and a.dtype == np.uint16:
        a = _transparent(a, transparency)
      return to_rgb_uint8(a, path)
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


def demo_photos() -> Dict[str, np.ndarray]:
  """The small corpus photos the package ships (hvq_jax/photos/SOURCES.md), by file name."""
  return {os.path.basename(p): read_image(p) for p in list_images(DEMO_PHOTOS_DIR)}


def bundled_photos(split: str) -> Dict[str, np.ndarray]:
  """'train': TRAIN_PHOTOS and the demo photos; 'heldout': HELDOUT_PHOTOS."""
  if split == "train":
    return {**{n: bundled_photo(n) for n in TRAIN_PHOTOS}, **demo_photos()}
  return {n: bundled_photo(n) for n in HELDOUT_PHOTOS}


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
  """A split of a prepared TFDS dataset, read with random access -> RGB uint8.

  Reads the dataset's ArrayRecord (or Parquet) files through `builder.as_data_source`:
  no TensorFlow, and never a download. Prepare the data once where there is network,
  in a random-access format:

      tfds build NAME --data_dir=DIR --file_format=array_record

  (or `tfds.builder(NAME, data_dir=DIR, file_format='array_record').download_and_prepare()`),
  then copy DIR where training runs if needed. The builder's code is not needed to read it:
  TFDS finds the dataset from its files (DIR/NAME/VERSION/dataset_info.json). `name` may
  carry a config and version ('NAME/CONFIG:1.2.0'), `split` TFDS slicing ('train[:90%]').
  """

  def __init__(self, name: str, split: str, data_dir: str, image_key: str = "image"):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ImportError("data.source='tfds' needs tensorflow-datasets: "
                        "pip install 'hvq_jax[tfds]'") from None
    where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    how = (f"prepare it once where there is network: tfds build {name} "
           f"--data_dir={data_dir or 'DIR'} --file_format=array_record (data.source='tfds' "
           f"reads prepared files and never downloads)")
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
      builder = None
    if builder is None or not builder.is_prepared():
      raise ImageError(f"TFDS dataset {name!r} is not prepared in {where}; {how}")
    info = builder.info
    if info.file_format is not None and info.file_format.value not in ("array_record", "parquet"):
      raise ImageError(
          f"TFDS dataset {name!r} in {builder.data_dir} was prepared as "
          f"{info.file_format.value}, which has no random access; prepare it again with "
          f"--file_format=array_record (tfds build {name} --data_dir=... "
          f"--file_format=array_record), or convert it with `tfds convert_format`")
    features = info.features
    keys = list(features.keys()) if hasattr(features, "keys") else []
    if image_key not in keys or not isinstance(features[image_key], tfds.features.Image):
      images = [k for k in keys if isinstance(features[k], tfds.features.Image)]
      raise ImageError(f"TFDS dataset {name!r} has no image feature {image_key!r} "
                       f"(its features: {keys}; image features: {images})")
    try:
      self._src = builder.as_data_source(split=split)
    except ValueError as e:   # an unknown split or a bad slice
      raise ImageError(f"TFDS dataset {name!r}: split {split!r}: {e} "
                       f"(splits: {list(info.splits)})") from None
    self._key = image_key
    self._name = f"{name}[{split}]"

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return to_rgb_uint8(np.asarray(self._src[i][self._key]), f"{self._name} example {i}")
