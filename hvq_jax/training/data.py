"""Training data with grain: random-access sources -> random crops/flips -> colour
augmentation -> batches.

Deterministic per seed (grain derives each element's RNG from the seed and its index),
resumable (the iterator's state is saved in the checkpoint), and sharded by process:
each process reads only `source[process_index::process_count]`.
"""
from typing import Sequence

import numpy as np
import grain
from PIL import Image

from hvq_jax import images
from hvq_jax.images import ImageFolder, InMemoryImages, TfdsImages


def make_source(data_cfg, split: str = "train"):
  kind = data_cfg.source
  if kind == "bundled":
    return InMemoryImages(list(images.bundled_photos(split).values()))
  if kind == "folder":
    return ImageFolder(data_cfg.train_dir if split == "train" else data_cfg.eval_dir)
  if kind == "tfds":
    return TfdsImages(data_cfg.tfds_name, data_cfg.tfds_split if split == "train"
                      else data_cfg.tfds_eval_split, data_cfg.tfds_data_dir)
  raise ValueError(f"config.data.source must be 'bundled', 'folder' or 'tfds', got {kind!r}")


class RandomCrop(grain.transforms.RandomMap):
  """Random rescale (scale in [min_scale, 1]), random crop to `size`, random h-flip.

  Images smaller than the crop are upscaled first so every example has the full size.
  """

  def __init__(self, size: int, min_scale: float = 1.0, flip: bool = True):
    self.size, self.min_scale, self.flip = size, min_scale, flip

  def random_map(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    s = self.size
    scale = rng.uniform(self.min_scale, 1.0) if self.min_scale < 1.0 else 1.0
    scale = max(scale, s / min(h, w))            # never crop outside the image
    win = min(int(round(s / scale)), h, w)
    top = int(rng.integers(0, h - win + 1))
    left = int(rng.integers(0, w - win + 1))
    crop = img[top:top + win, left:left + win]
    if win != s:
      crop = np.asarray(Image.fromarray(crop).resize((s, s), Image.Resampling.BICUBIC))
    if self.flip and rng.random() < 0.5:
      crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


# RGB <-> YIQ (NTSC): Y is luma, (I, Q) the chroma plane a hue rotation turns.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263],
                 [0.211456, -0.522591, 0.311135]])
_RGB = np.linalg.inv(_YIQ)


class ColorJitter(grain.transforms.RandomMap):
  """Hue rotation (uniform in +-`hue_deg`), chroma scaling (uniform in 1 +- `saturation`)
  in YIQ, luma kept, then a random RGB channel permutation with probability `permute`.

  Ten bundled training photos with few greens and blues cannot teach a codebook the
  gamut: models trained on them decoded grass grey-beige and skies grey. Deterministic
  per seed and element, like the crops (grain gives each element its own RNG).
  """

  def __init__(self, hue_deg: float = 0.0, saturation: float = 0.0, permute: float = 0.0):
    self.hue, self.sat, self.permute = float(hue_deg), float(saturation), float(permute)

  def matrix(self, rng: np.random.Generator) -> np.ndarray:
    """The 3x3 colour transform (acting on RGB column vectors) for one element."""
    theta = np.deg2rad(rng.uniform(-self.hue, self.hue)) if self.hue else 0.0
    scale = rng.uniform(1.0 - self.sat, 1.0 + self.sat) if self.sat else 1.0
    c, s = np.cos(theta) * scale, np.sin(theta) * scale
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = _RGB @ chroma @ _YIQ
    if self.permute and rng.random() < self.permute:
      m = m[rng.permutation(3)]
    return m

  def random_map(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if not (self.hue or self.sat or self.permute):
      return img
    m = self.matrix(rng)
    out = np.asarray(img, np.float32) @ m.T.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def train_dataset(config, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Infinite iterator of uint8 batches [B_local, S, S, 3], B_local = batch_size / processes."""
  batch = config.train.batch_size
  if batch % process_count:
    raise ValueError(f"train.batch_size={batch} is not divisible by {process_count} processes")
  src = make_source(config.data, "train")
  ds = grain.MapDataset.source(src)
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = (ds.shuffle(seed=config.seed)
        .repeat(None)
        .random_map(RandomCrop(config.image_size, config.data.min_scale, config.data.flip),
                    seed=config.seed + 1)
        .random_map(ColorJitter(config.data.get("color_hue_deg", 0.0),
                                config.data.get("color_saturation", 0.0),
                                config.data.get("color_permute", 0.0)),
                    seed=config.seed + 2)
        .batch(batch // process_count, drop_remainder=True))
  it = ds.to_iter_dataset()
  if config.data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it
