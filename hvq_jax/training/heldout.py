"""The held-out report at the end of training: centre crops of held-out photos at every
lambda, PSNR, MS-SSIM, the rate model's bpp and codebook usage (real files: `hvq eval`)."""
import functools
import os
from typing import Any, Dict

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax import images as images_lib
from hvq_jax.evaluation import metrics as metrics_lib
from hvq_jax.layout import GRANULARITIES
from hvq_jax.nn import model as model_lib


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  h, w = img.shape[:2]
  s = min(size, h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return img[top:top + s, left:left + s]


@functools.partial(jax.jit, static_argnums=(0,))
def eval_forward(model, params, x_uint8, lmbda, ratios):
  """Eval-mode forward of uint8 images: (recon uint8, estimated bpp, indices, masks)."""
  x = x_uint8.astype(jnp.float32) / 127.5 - 1.0
  out = model.apply({"params": params}, x, jnp.full((x.shape[0],), lmbda), ratios)
  recon = jnp.clip(jnp.round((out["recon"] + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return recon, out["bpp"], out["indices"], out["masks"]


def evaluate(model, params, photos: Dict[str, np.ndarray], lmbdas, ratios,
             crop: int) -> Dict[str, Any]:
  """Per-lambda held-out figures: PSNR, MS-SSIM, estimated bpp, codebook usage."""
  batch = np.stack([center_crop(p, crop) for p in photos.values()])
  ratios = jnp.asarray(ratios, jnp.float32)
  results = {}
  for lm in lmbdas:
    recon, bpp, idx, masks = jax.device_get(eval_forward(model, params, batch, float(lm), ratios))
    used = np.concatenate([idx[g][masks[g]] for g in GRANULARITIES])   # first VQ stage
    per = [dict(name=n, psnr=metrics_lib.psnr(a, r), ms_ssim=metrics_lib.ms_ssim(a, r),
                bpp=float(b)) for n, a, r, b in zip(photos, batch, recon, bpp)]
    results[f"{float(lm):g}"] = dict(
        psnr=float(np.mean([p["psnr"] for p in per])),
        ms_ssim=float(np.mean([p["ms_ssim"] for p in per])),
        bpp=float(np.mean([p["bpp"] for p in per])),
        codebook_used=int(np.unique(used).size), images=per)
  return results


def format_eval(results: Dict[str, Any]) -> str:
  lines = ["held-out photos (estimated bpp from the rate model):",
           f"{'lambda':>8} {'bpp':>7} {'PSNR':>7} {'MS-SSIM':>8} {'codes used':>10}"]
  for lm, r in results.items():
    lines.append(f"{lm:>8} {r['bpp']:7.4f} {r['psnr']:7.2f} {r['ms_ssim']:8.4f} "
                 f"{r['codebook_used']:>10}")
  return "\n".join(lines)


def eval_photos(config) -> Dict[str, np.ndarray]:
  """The held-out photos of the final evaluation (checked before training starts)."""
  d = config.data
  if d.source == "bundled":
    return images_lib.bundled_photos("heldout")
  if d.source == "folder":
    paths = images_lib.list_images(d.eval_dir)
    photos = {os.path.basename(p): images_lib.read_image(p) for p in paths}
  else:
    src = images_lib.TfdsImages(d.tfds_name, d.tfds_eval_split, d.tfds_data_dir)
    n = min(len(src), int(config.eval.num_images))
    photos = {f"{d.tfds_name}_{i:05d}": src[i] for i in range(n)}
  # The evaluation is one batch of centre crops: all of them must have the full size.
  size = config.eval.image_size
  small = [k for k, v in photos.items() if min(v.shape[:2]) < size]
  photos = {k: v for k, v in photos.items() if k not in small}
  if small:
    print(f"evaluation: {len(small)} image(s) smaller than eval.image_size={size} left out")
  if not photos:
    raise model_lib.ConfigError(
        f"no held-out image of at least {size} px for the final evaluation in "
        f"data.source={d.source!r}; lower config.eval.image_size or set "
        f"--config.eval.enabled=False")
  return photos


def check_eval_source(config) -> None:
  """Before training: the held-out photos of the final report can be found."""
  d = config.data
  if not config.eval.enabled:
    return
  if d.source == "folder" and not d.eval_dir:
    raise model_lib.ConfigError(
        "config.data.eval_dir is empty: the final evaluation needs held-out images "
        "(set --config.data.eval_dir=DIR, or --config.eval.enabled=False)")
  if d.source == "tfds" and not d.tfds_eval_split:
    raise model_lib.ConfigError(
        "config.data.tfds_eval_split is empty: set it (e.g. 'validation'), or "
        "--config.eval.enabled=False")


def image_grid(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """Originals over their reconstructions, for TensorBoard."""
  return np.concatenate([np.concatenate(list(originals), 1), np.concatenate(list(recons), 1)], 0)
