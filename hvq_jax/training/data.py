"""Training data with grain: random-access sources -> random crops/flips -> batches.

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
        .batch(batch // process_count, drop_remainder=True))
  it = ds.to_iter_dataset()
  if config.data.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it
