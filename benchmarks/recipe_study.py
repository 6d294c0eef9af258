"""The recipe study: staged default vs the joint recipe vs the hyperprior-off model.

Trains each recipe (configs/ablations.py `base` = the staged default, `joint`,
`hyperprior_off`) on the photo corpus's training split for several seeds (`hvq sweep`),
codes the corpus's held-out photos whole, at full size, to real files over six
granularity ratios (`hvq eval`), and writes into --out:
  study.json   every figure below, per seed and per photo
  README.md    the tables: saving over the static histogram on the same indices, BD-rate at
               equal PSNR and at equal LPIPS between the recipes, colour shift per channel,
               calibration and codebook usage of the joint prior; means with their spread
  rd_*.png     the RD curves of every run (the sweep's plots)

  python scripts/prepare_corpus.py --out /data/corpus
  python benchmarks/recipe_study.py --corpus /data/corpus --workdir runs/recipe --out results/recipe

Runs already finished in --workdir are skipped, so an interrupted study resumes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RECIPES = {"base": "staged (default)", "joint": "joint", "hyperprior_off": "hyperprior off"}
RATIOS = "0,0.2,0.8;0.1,0.4,0.5;0.3,0.4,0.3;0.5,0.3,0.2;0.7,0.2,0.1;0.9,0.1,0"


def run_sweep(a) -> int:
  ev = (f"--images {a.corpus}/heldout --fit-images {a.corpus}/train --lmbdas {a.lmbda} "
        f"--ratios '{RATIOS}' --baselines jpeg --no-dists --no-fid --no-plots")
  cmd = [sys.executable, "-m", "hvq_jax.cli", "sweep", "--config",
         os.path.join(ROOT, "configs", "ablations.py"), "--workdir", a.workdir,
         "--variants", ",".join(RECIPES), "--grid", "seed=" + ",".join(map(str, a.seeds)),
         "--eval", ev, "--config.data.source=folder",
         f"--config.data.train_dir={a.corpus}/train", f"--config.data.eval_dir={a.corpus}/heldout"]
  cmd += [f"--config.train.num_steps={a.steps}"] if a.steps else []
  print("+", " ".join(cmd), flush=True)
  return subprocess.run(cmd, cwd=ROOT).returncode


def _rows(run_dir):
  from hvq_jax.evaluation import evaluate
  return evaluate.read_csv(os.path.join(run_dir, "eval", "results.csv"))


def _channel_shift(run_dir, rows, corpus):
  """Mean |mean_c(original) - mean_c(decoded)| per channel c over photos and settings."""
  from hvq_jax import images
  out = []
  for r in rows:
    name = f"{r['image']}__{r['setting'].replace(' ', '__')}.png"
    rec = images.read_image(os.path.join(run_dir, "eval", "recon", name))
    orig = images.read_image(os.path.join(corpus, "heldout", r["image"] + ".png"))
    out.append(np.abs(orig.reshape(-1, 3).mean(0) - rec.reshape(-1, 3).mean(0)))
  return np.mean(out, 0)


def _curve(rows, method="hvq"):
  from hvq_jax.evaluation import evaluate
  return evaluate.curves([r for r in rows if r["method"] == method])[method]


def _bd(anchor, test, metric):
  from hvq_jax.evaluation import bd_rate
  try:
    return bd_rate.bd_rate([p["bpp"] for p in anchor], [p[metric] for p in anchor],
                           [p["bpp"] for p in test], [p[metric] for p in test])
  except ValueError:
    return None


def analyse(a) -> dict:
  runs = {}
  for v in RECIPES:
    for s in a.seeds:
      d = os.path.join(a.workdir, f"{v}__seed={s}")
      if not os.path.isfile(os.path.join(d, "eval", "summary.json")):
        continue
      rows = _rows(d)
      ours = [r for r in rows if r["method"] == "hvq"]
      summary = json.load(open(os.path.join(d, "eval", "summary.json")))
      runs[(v, s)] = dict(
          dir=d, rows=rows, summary=summary, curve=_curve(rows),
          saving=summary["hyperprior_saving_vs_static"],
          saving_per_photo=summary["saving_vs_static_per_image"],
          static_vs_fixed=summary["static_saving_vs_fixed_length"],
          shift_rgb=_channel_shift(d, ours, a.corpus).tolist(),
          branches=summary["per_branch_bits_per_index"])
  jpeg = next((_curve(r["rows"], "jpeg") for r in runs.values()), None)
  per_seed = {}
  for s in a.seeds:
    if (("base", s) not in runs):
      continue
    st = runs[("base", s)]
    row = dict(saving=st["saving"], shift_rgb=st["shift_rgb"])
    for other in ("hyperprior_off", "joint"):
      if (other, s) in runs:
        o = runs[(other, s)]
        row[f"bd_psnr_vs_{other}"] = _bd(o["curve"], st["curve"], "psnr")
        row[f"bd_lpips_vs_{other}"] = _bd(o["curve"], st["curve"], "lpips")
        row[f"{other}_saving"] = o["saving"]
        row[f"{other}_shift_rgb"] = o["shift_rgb"]
    per_seed[s] = row
  return dict(runs=runs, per_seed=per_seed, jpeg=jpeg)


def _ms(vals):
  vals = [v for v in vals if v is not None]
  if not vals:
    return "-"
  return f"{np.mean(vals):+.1f}" + (f" ± {np.std(vals):.1f}" if len(vals) > 1 else "")


def report(a, res, wall) -> str:
  runs, per_seed = res["runs"], res["per_seed"]
  lines = ["# The recipe study", "",
           f"Corpus: {a.corpus} (docs/corpus.md); held-out photos coded whole at full size "
           f"to real files; lambda {a.lmbda}, ratios {RATIOS.replace(';', ' / ')}; seeds "
           f"{', '.join(map(str, a.seeds))}; {a.steps or 'config'} steps per run; wall time "
           f"{wall / 3600:.1f} h on this machine. `±` is the standard deviation over seeds.", "",
           "## Saving over the static histogram on the same indices (z and map included)", "",
           "| recipe | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean ± sd | photos: min .. max |",
           "|---|" + "---|" * (len(a.seeds) + 2)]
  for v, label in RECIPES.items():
    if v == "hyperprior_off":
      continue
    vals = [100 * runs[(v, s)]["saving"] if (v, s) in runs else None for s in a.seeds]
    photos = [100 * x for s in a.seeds if (v, s) in runs
              for x in runs[(v, s)]["saving_per_photo"].values()]
    spread = f"{min(photos):+.1f} .. {max(photos):+.1f}%" if photos else "-"
    lines.append(f"| {label} | " + " | ".join("-" if x is None else f"{x:+.1f}%" for x in vals)
                 + f" | {_ms(vals)}% | {spread} |")
  lines += ["", "## BD-rate of the staged default (negative: fewer bits at equal quality)", "",
            "| against | metric | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean ± sd |",
            "|---|---|" + "---|" * (len(a.seeds) + 1)]
  for other in ("hyperprior_off", "joint"):
    for m in ("psnr", "lpips"):
      vals = [per_seed.get(s, {}).get(f"bd_{m}_vs_{other}") for s in a.seeds]
      lines.append(f"| {RECIPES[other]} | {m.upper()} | "
                   + " | ".join("n/a" if x is None else f"{x:+.1f}%" for x in vals)
                   + f" | {_ms(vals)}% |")
  lines += ["", "## Colour: mean shift per channel (R, G, B; /255) over photos and settings", "",
            "| recipe | " + " | ".join(f"seed {s}" for s in a.seeds) + " |",
            "|---|" + "---|" * len(a.seeds)]
  for v, label in RECIPES.items():
    lines.append(f"| {label} | " + " | ".join(
        "-" if (v, s) not in runs else "{:.1f} / {:.1f} / {:.1f}".format(*runs[(v, s)]["shift_rgb"])
        for s in a.seeds) + " |")
  lines += ["", "## RD points (mean over photos: bpp / PSNR / LPIPS)", ""]
  for (v, s), r in sorted(runs.items()):
    lines.append(f"- {RECIPES[v]}, seed {s}: " + ", ".join(
        f"{p['bpp']:.3f} / {p['psnr']:.2f} / {p['lpips'] if p['lpips'] is None else round(p['lpips'], 3)}"
        for p in r["curve"]))
  if res["jpeg"]:
    lines.append("- JPEG: " + ", ".join(f"{p['bpp']:.3f} / {p['psnr']:.2f}" for p in res["jpeg"]))
  lines += ["", "## Why the joint prior fails: calibration and codebook usage", "",
            "| run | static code vs fixed length | stream: hyperprior y / static bits per index, "
            "Mahalanobis RMS of the chosen entry |", "|---|---|---|"]
  for (v, s), r in sorted(runs.items()):
    if v == "hyperprior_off":
      lines.append(f"| {RECIPES[v]}, seed {s} | {100 * r['static_vs_fixed']:.1f}% | - |")
      continue
    br = "; ".join(f"{b}: {x['hyperprior_y']:.2f} / {x['static']:.2f}, "
                   f"{x.get('chosen_mahalanobis_rms', float('nan')):.2f}"
                   for b, x in r["branches"].items())
    lines.append(f"| {RECIPES[v]}, seed {s} | {100 * r['static_vs_fixed']:.1f}% | {br} |")
  lines += ["", "## Saving per photo (staged default)", "",
            "| photo | " + " | ".join(f"seed {s}" for s in a.seeds) + " |",
            "|---|" + "---|" * len(a.seeds)]
  names = sorted({n for s in a.seeds if ("base", s) in runs for n in runs[("base", s)]["saving_per_photo"]})
  for n in names:
    lines.append(f"| {n} | " + " | ".join(
        "-" if ("base", s) not in runs else f"{100 * runs[('base', s)]['saving_per_photo'][n]:+.1f}%"
        for s in a.seeds) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--corpus", required=True, help="scripts/prepare_corpus.py's output")
  ap.add_argument("--workdir", required=True, help="run folders (not copied to --out)")
  ap.add_argument("--out", required=True, help="results folder, e.g. results/recipe")
  ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
  ap.add_argument("--steps", type=int, default=0, help="steps per run (default: the config's)")
  ap.add_argument("--lmbda", default="0.2")
  ap.add_argument("--analyse-only", action="store_true")
  a = ap.parse_args(argv)
  a.corpus = os.path.abspath(a.corpus)
  t0 = time.time()
  rc = 0 if a.analyse_only else run_sweep(a)
  res = analyse(a)
  os.makedirs(a.out, exist_ok=True)
  for f in os.listdir(a.workdir):
    if f.startswith(("rd_", "table.", "pairs.", "branches.")):
      shutil.copy(os.path.join(a.workdir, f), os.path.join(a.out, f))
  text = report(a, res, time.time() - t0)
  open(os.path.join(a.out, "README.md"), "w").write(text)
  dump = dict(per_seed={str(k): v for k, v in res["per_seed"].items()},
              runs={f"{v}__seed={s}": {k: r[k] for k in ("saving", "saving_per_photo",
                                                         "static_vs_fixed", "shift_rgb",
                                                         "branches", "curve")}
                    for (v, s), r in res["runs"].items()},
              jpeg=res["jpeg"], ratios=RATIOS, lmbda=a.lmbda, seeds=a.seeds, steps=a.steps)
  json.dump(dump, open(os.path.join(a.out, "study.json"), "w"), indent=1)
  print(text)
  return rc


if __name__ == "__main__":
  sys.exit(main())
