"""`hvq plot`: RD curves (bpp vs PSNR / MS-SSIM / LPIPS) and a side-by-side image strip."""
import glob
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

METRICS = (("psnr", "PSNR (dB)", True), ("ms_ssim", "MS-SSIM", True), ("lpips", "LPIPS (lower is better)", False))


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def rd_plots(result_dirs: Sequence[str], out_dir: str, include_published: bool = True) -> List[str]:
  """One figure per metric, one curve per method (and per results dir for our model)."""
  from hvq_jax.evaluation import evaluate
  plt = _plt()
  os.makedirs(out_dir, exist_ok=True)
  series = []   # (label, points, style)
  multi = len(result_dirs) > 1
  for d in result_dirs:
    path = os.path.join(d, "results.csv")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{d}: no results.csv (run `hvq eval` first)")
    cv = evaluate.curves(evaluate.read_csv(path))
    for m, pts in cv.items():
      if m != "hvq" and multi and d != result_dirs[0]:
        continue  # baselines once, from the first dir
      run = os.path.basename(os.path.normpath(d))
      if run == "eval":   # a sweep's run/eval folder: name it by the run
        run = os.path.basename(os.path.dirname(os.path.normpath(d)))
      label = f"hvq ({run})" if m == "hvq" and multi else m
      series.append((label, pts, "o-" if m == "hvq" else ".--"))
  if include_published:
    from hvq_jax.evaluation import baselines
    for ref in baselines.published():
      series.append((f"{ref['method']} [{ref['dataset']}, published]", ref["points"], "x:"))
  written = []
  for key, ylabel, _ in METRICS:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    drawn = 0
    for label, pts, style in series:
      p = [(q["bpp"], q[key]) for q in pts if q.get(key) is not None]
      if len(p) >= 1:
        x, y = zip(*sorted(p))
        ax.plot(x, y, style, label=label, markersize=4)
        drawn += 1
    if not drawn:
      plt.close(fig)
      continue
    ax.set_xlabel("bits per pixel (file size)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    for ext in ("png", "svg"):
      f = os.path.join(out_dir, f"rd_{key}.{ext}")
      fig.savefig(f, dpi=130)
      written.append(f)
    plt.close(fig)
  return written


def image_strip(result_dir: str, image: str, original: np.ndarray, out_path: str,
                setting: Optional[str] = None, codec: str = "jpeg") -> str:
  """Original | ours | `codec` at the closest bpp, with bpp and PSNR in the titles."""
  from PIL import Image
  from hvq_jax.evaluation import baselines
  from hvq_jax.evaluation import metrics
  plt = _plt()
  recons = sorted(glob.glob(os.path.join(result_dir, "recon", f"{image}__*.png")))
  if not recons:
    raise FileNotFoundError(f"{result_dir}/recon: no reconstructions of {image!r} "
                            "(run `hvq eval` with reconstructions saved)")
  if setting is not None:
    recons = [r for r in recons if setting.replace(" ", "__") in r] or recons
  from hvq_jax.evaluation import evaluate
  rows = {r["setting"].replace(" ", "__"): r for r in evaluate.read_csv(
      os.path.join(result_dir, "results.csv")) if r["method"] == "hvq" and r["image"] == image}
  path = recons[len(recons) // 2]
  key = os.path.basename(path)[len(image) + 2:-4]
  ours = np.asarray(Image.open(path).convert("RGB"))
  bpp = rows[key]["bpp"]
  q, data, base = baselines.closest_quality(original, codec, bpp)
  hw = original.shape[0] * original.shape[1]
  panels = [("original", original), (f"hvq {bpp:.3f} bpp, {metrics.psnr(original, ours):.2f} dB", ours),
            (f"{codec} q={q} {8 * len(data) / hw:.3f} bpp, {metrics.psnr(original, base):.2f} dB", base)]
  fig, axes = plt.subplots(1, 3, figsize=(12, 4.2 * original.shape[0] / original.shape[1] + 0.6))
  for ax, (title, im) in zip(axes, panels):
    ax.imshow(im)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=130)
  plt.close(fig)
  return out_path
