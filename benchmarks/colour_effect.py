"""What the file's colour transform (hvq_jax/colour.py) does to an evaluation made without it.

An `hvq eval` folder of files without the transform (format 3, or `--no-colour`) keeps each
file's decoded image in recon/. The transform the encoder would send is `colour.fit` of
exactly that image against the original, and the decoder's output `colour.apply` of it
(tests/test_colour.py checks both against the codec), so its effect follows from recon/
without coding again: the same indices, 24 more bytes per file.

  python benchmarks/colour_effect.py --eval RUN/eval --images CORPUS/heldout \\
      --out results/colour/RUN.json [--lpips-weights DIR]

Per file and as means: PSNR, LPIPS, the mean shift per channel (R, G, B; /255) and the same
in 64 px blocks (a local cast), before and after; BD-rate of after against before.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

BLOCK = 64
ADDED_BYTES = 24     # the 12 int16 words of format 4


def recon_path(eval_dir: str, row: dict) -> str:
  """Where `hvq eval` keeps the decoded image of one results.csv row."""
  return os.path.join(eval_dir, "recon", f"{row['image']}__{row['setting'].replace(' ', '__')}.png")


def channel_shift(a, b):
  """|mean_c(a) - mean_c(b)| per channel c (float64 [3])."""
  return np.abs(a.reshape(-1, 3).mean(0, dtype=np.float64) - b.reshape(-1, 3).mean(0, dtype=np.float64))


def block_shift(a, b, block=BLOCK):
  """channel_shift in every whole block x block tile, averaged over tiles ([3])."""
  h, w = (a.shape[0] // block) * block, (a.shape[1] // block) * block
  if not (h and w):
    return channel_shift(a, b)
  f = lambda x: x[:h, :w].astype(np.float64).reshape(h // block, block, w // block, block, 3).mean((1, 3))
  return np.abs(f(a) - f(b)).reshape(-1, 3).mean(0)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--eval", required=True, help="an `hvq eval` output folder with recon/")
  ap.add_argument("--images", required=True, help="the originals it coded")
  ap.add_argument("--out", required=True, help="JSON to write")
  ap.add_argument("--lpips-weights", default=None)
  ap.add_argument("--added-bytes", type=int, default=ADDED_BYTES,
                  help="bytes the transform adds to each file (0 if the files had it)")
  a = ap.parse_args(argv)
  from hvq_jax import colour, images
  from hvq_jax.evaluation import bd_rate, evaluate, metrics
  lp = evaluate.LpipsMetric("alexnet", a.lpips_weights)
  rows = [r for r in evaluate.read_csv(os.path.join(a.eval, "results.csv")) if r["method"] == "hvq"]
  if not rows:
    raise SystemExit(f"{a.eval}/results.csv has no hvq rows")
  per = []
  for r in rows:
    path = recon_path(a.eval, r)
    name = os.path.basename(path)
    if not os.path.isfile(path):
      raise SystemExit(f"{path}: missing (the eval must keep its reconstructions)")
    rec = images.read_image(path)
    orig = images.read_image(os.path.join(a.images, r["image"] + ".png"))
    words = colour.fit(rec, orig)
    out = colour.apply(rec, words)
    px = orig.shape[0] * orig.shape[1]
    per.append(dict(
        image=r["image"], setting=r["setting"], words=list(words),
        bpp_before=float(r["bpp"]), bpp_after=float(r["bpp"]) + 8 * a.added_bytes / px,
        psnr_before=metrics.psnr(orig, rec), psnr_after=metrics.psnr(orig, out),
        lpips_before=lp(orig, rec), lpips_after=lp(orig, out),
        shift_before=channel_shift(rec, orig).tolist(), shift_after=channel_shift(out, orig).tolist(),
        block_shift_before=block_shift(rec, orig).tolist(),
        block_shift_after=block_shift(out, orig).tolist()))
    print(f"{name}: PSNR {per[-1]['psnr_before']:.2f} -> {per[-1]['psnr_after']:.2f}, shift "
          + " / ".join(f"{x:.1f}" for x in per[-1]["shift_before"]) + " -> "
          + " / ".join(f"{x:.1f}" for x in per[-1]["shift_after"]), flush=True)
  mean = lambda k: np.mean([p[k] for p in per], 0).tolist() if per[0][k] is not None else None
  curves = {}
  for when in ("before", "after"):
    by = {}
    for p in per:
      by.setdefault(p["setting"], []).append(p)
    curves[when] = [dict(bpp=float(np.mean([p[f"bpp_{when}"] for p in v])),
                         psnr=float(np.mean([p[f"psnr_{when}"] for p in v])),
                         lpips=(float(np.mean([p[f"lpips_{when}"] for p in v]))
                                if v[0][f"lpips_{when}"] is not None else None))
                    for v in by.values()]
  bd = {}
  for m in ("psnr", "lpips"):
    try:
      col = lambda w, k: [c[k] for c in curves[w]]
      bd[m] = bd_rate.bd_rate(col("before", "bpp"), col("before", m),
                              col("after", "bpp"), col("after", m))
    except (ValueError, TypeError):
      bd[m] = None
  photos = sorted({p["image"] for p in per})
  psnr_gain = {n: float(np.mean([p["psnr_after"] - p["psnr_before"] for p in per if p["image"] == n]))
               for n in photos}
  summary = dict(
      eval=a.eval, images=a.images, files=len(per), photos=len(photos), added_bytes=a.added_bytes,
      **{k: mean(k) for k in ("bpp_before", "bpp_after", "psnr_before", "psnr_after",
                              "lpips_before", "lpips_after", "shift_before", "shift_after",
                              "block_shift_before", "block_shift_after")},
      psnr_gain_per_photo=psnr_gain, bd_rate_after_vs_before=bd, curves=curves, files_detail=per)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  json.dump(summary, open(a.out, "w"), indent=1)
  g = list(psnr_gain.values())
  print(f"\n{len(per)} files, {len(photos)} photos: PSNR {summary['psnr_before']:.2f} -> "
        f"{summary['psnr_after']:.2f} (per photo {min(g):+.2f} .. {max(g):+.2f} dB); shift "
        + " / ".join(f"{x:.1f}" for x in summary["shift_before"]) + " -> "
        + " / ".join(f"{x:.2f}" for x in summary["shift_after"]) + "; 64 px blocks "
        + " / ".join(f"{x:.1f}" for x in summary["block_shift_before"]) + " -> "
        + " / ".join(f"{x:.1f}" for x in summary["block_shift_after"])
        + f"; BD-rate after vs before: PSNR {bd['psnr']}, LPIPS {bd['lpips']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
