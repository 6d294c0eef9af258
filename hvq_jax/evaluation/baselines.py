"""Baselines on the same images: Pillow's JPEG, WebP and AVIF, and published points.

Published points are typed in from papers into `hvq_jax/reference/*.json` with their
source; `published()` loads them (and any file a user passes) for the same table/plot.
"""
import glob
import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, features

QUALITIES = {
    "jpeg": (5, 10, 20, 30, 50, 75, 90),
    "webp": (5, 10, 20, 30, 50, 75, 90),
    "avif": (5, 10, 20, 30, 50, 75, 90),
}
_PIL_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
_FEATURE = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}


def available(codec: str) -> bool:
  return codec in _PIL_FORMAT and bool(features.check(_FEATURE[codec]))


def encode_decode(img: np.ndarray, codec: str, quality: int) -> Tuple[bytes, np.ndarray]:
  """uint8 [H, W, 3] -> (file bytes, decoded uint8 [H, W, 3]) with Pillow's encoder.

  JPEG uses 4:2:0 chroma (Pillow's default, what "JPEG" means in RD tables); WebP is
  lossy mode; AVIF uses Pillow's default speed.
  """
  if not available(codec):
    raise ValueError(f"{codec} is not available in this Pillow build")
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format=_PIL_FORMAT[codec], quality=int(quality))
  data = buf.getvalue()
  with Image.open(io.BytesIO(data)) as im:
    out = np.asarray(im.convert("RGB"))
  return data, out


def closest_quality(img: np.ndarray, codec: str, target_bpp: float,
                    qualities: Sequence[int] = tuple(range(1, 96))) -> Tuple[int, bytes, np.ndarray]:
  """The quality whose file is closest to `target_bpp` (for side-by-side strips)."""
  best = None
  hw = img.shape[0] * img.shape[1]
  for q in qualities:
    data, out = encode_decode(img, codec, q)
    gap = abs(8 * len(data) / hw - target_bpp)
    if best is None or gap < best[0]:
      best = (gap, q, data, out)
  return best[1], best[2], best[3]


REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")


def published(extra_files: Optional[Sequence[str]] = None) -> List[Dict]:
  """Reference curves: [{method, dataset, source, metric_names, points: [{bpp, ...}]}]."""
  out = []
  for path in sorted(glob.glob(os.path.join(REFERENCE_DIR, "*.json"))) + list(extra_files or []):
    with open(path) as f:
      entry = json.load(f)
    for k in ("method", "dataset", "source", "points"):
      if k not in entry:
        raise ValueError(f"{path}: reference file lacks the key {k!r}")
    out.append(entry)
  return out
