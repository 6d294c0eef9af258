"""`hvq plot`: RD curves (bpp vs PSNR / MS-SSIM / LPIPS / DISTS / FID / KID, with the field's
published curves of the same dataset) and a side-by-side image strip."""
import glob
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

METRICS = (("psnr", "PSNR (dB)", True), ("ms_ssim", "MS-SSIM", True),
           ("lpips", "LPIPS (lower is better)", False), ("dists", "DISTS (lower is better)", False),
           ("fid", "FID/256 (lower is better)", False), ("kid", "KID/256 (lower is better)", False))
PUBLISHED_STYLE = dict(linestyle=(0, (4, 2)), marker="D", markerfacecolor="none", markersize=5,
                       linewidth=1.2, alpha=0.85)


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _summary(d):
  path = os.path.join(d, "summary.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def rd_plots(result_dirs: Sequence[str], out_dir: str, include_published: bool = True,
             dataset: Optional[str] = None) -> List[str]:
  """One figure per metric, one curve per method (and per results dir for our model).

  Published curves are drawn only when they were measured on the evaluated images'
  dataset (`dataset`, else the one `hvq eval --dataset` recorded), in their own dashed,
  hollow-marker style, labelled with dataset and source; LPIPS curves of another
  backbone are left out. An unknown dataset draws none and says so in the title.
  """
  from hvq_jax.evaluation import evaluate
  from hvq_jax.evaluation import published as published_lib
  plt = _plt()
  os.makedirs(out_dir, exist_ok=True)
  series = []   # (label, points, style kwargs)
  multi = len(result_dirs) > 1
  first = _summary(result_dirs[0])
  dataset = published_lib.normalise(dataset or first.get("dataset"))
  lpips_net = (first.get("lpips") or {}).get("net")
  patches = (first.get("fid_kid") or {}).get("patches")
  for d in result_dirs:
    path = os.path.join(d, "results.csv")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{d}: no results.csv (run `hvq eval` first)")
    cv = evaluate.curves(evaluate.read_csv(path),
                         evaluate.read_fid_kid(os.path.join(d, "fid_kid.csv")))
    for m, pts in cv.items():
      if m != "hvq" and multi and d != result_dirs[0]:
        continue  # baselines once, from the first dir
      run = os.path.basename(os.path.normpath(d))
      if run == "eval":   # a sweep's run/eval folder: name it by the run
        run = os.path.basename(os.path.dirname(os.path.normpath(d)))
      label = f"hvq ({run})" if m == "hvq" and multi else m
      style = dict(marker="o", linestyle="-") if m == "hvq" else dict(marker=".", linestyle="--")
      series.append((label, pts, style))
  refs = published_lib.for_dataset(dataset) if include_published else []
  written, record = [], {}
  for key, ylabel, _ in METRICS:
    fig, ax = plt.subplots(figsize=(6.4, 4.5))
    labels, ours = [], 0
    for label, pts, style in series:
      p = [(q["bpp"], q[key]) for q in pts if q.get(key) is not None]
      if p:
        x, y = zip(*sorted(p))
        ax.plot(x, y, label=label, markersize=4, **style)
        labels.append(label)
        ours += 1
    caveats = []
    for e in refs:
      ok, why = published_lib.comparable(e, key, lpips_net)
      if not ok:
        if not why.startswith("no published"):
          caveats.append(f"{e['method']}: not drawn ({why})")
        continue
      p = sorted((q["bpp"], q[key]) for q in e["points"] if q.get(key) is not None)
      x, y = zip(*p)
      lab = published_lib.label(e) + (" *" if why and key == "lpips" else "")
      ax.plot(x, y, label=lab, **PUBLISHED_STYLE)
      labels.append(lab)
      if why and key == "lpips":
        caveats.append(f"* {why}")
    if not ours:
      plt.close(fig)
      continue
    title = f"{ylabel.split(' (')[0]} on {dataset or 'an unnamed image set'}"
    if key in ("fid", "kid") and patches:
      title += f" ({int(patches)} patches of 256x256)"
    if not include_published:
      note = "published curves off"
    elif dataset is None:
      note = "published curves not drawn: dataset unknown (--dataset kodak|clic2020|...)"
    elif not refs:
      note = (f"no published curves for '{dataset}' "
              f"(known: {', '.join(published_lib.known_datasets())})")
    elif not any(published_lib.comparable(e, key, lpips_net)[0] for e in refs):
      note = f"no published {key} for {dataset}"
    else:
      note = ""
    ax.set_title(title + ("\n" + note if note else ""), fontsize=9)
    if caveats:
      ax.text(0.01, 0.01, "\n".join(dict.fromkeys(caveats)), transform=ax.transAxes, fontsize=6,
              va="bottom", alpha=0.8)
    ax.set_xlabel("bits per pixel (file size)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    for ext in ("png", "svg"):
      f = os.path.join(out_dir, f"rd_{key}.{ext}")
      fig.savefig(f, dpi=130)
      written.append(f)
    plt.close(fig)
    record[key] = dict(title=title, note=note, curves=labels, caveats=list(dict.fromkeys(caveats)))
  with open(os.path.join(out_dir, "rd_plots.json"), "w") as f:   # what each figure shows
    json.dump(dict(dataset=dataset, figures=record), f, indent=1)
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
