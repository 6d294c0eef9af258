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

Runs already finished in --workdir are skipped, so an interrupted study resumes. `--reuse
A.json,B.json` takes runs (recipe, seed) from earlier studies' study.json (same corpus,
ratios, lambda and configs; later files win, a run finished in --workdir wins over all;
`--fresh R` takes none of recipe R), and only the rest are trained, so a new recipe or seed
is compared without retraining the old:

  python benchmarks/recipe_study.py --corpus /data/corpus --workdir runs/recipe_long \
      --out results/recipe_long --recipes staged_long --seeds 0,1 --reuse results/recipe/study.json

`--run RECIPE:SEED=DIR` counts an evaluated run folder made otherwise (e.g. a recipe's
phases as two runs: a tokenizer, then a plug-in prior on it) as that recipe's seed. Its
colour shift is read from its eval's reconstructions, or, where the eval kept none, from the
run of the same seed whose mean PSNR and LPIPS are identical at every setting (the same
tokenizer: the same pixels).
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
sys.path.insert(0, ROOT)    # configs/ and benchmarks/ as packages when run as a script
RECIPES = {"base": "staged (default)", "staged_long": "staged, tokenizer phase = hyperprior off's budget",
           "staged_long_quad": "staged_long, quad prior phase of 3x the steps",
           "joint": "joint", "hyperprior_off": "hyperprior off"}
STAGED = ("base", "staged_long", "staged_long_quad")      # the rows whose BD-rate against the others is reported
FIELDS = ("saving", "saving_per_photo", "static_vs_fixed", "shift_rgb", "shift_rgb_colour",
          "branches", "curve")
RATIOS = "0,0.2,0.8;0.1,0.4,0.5;0.3,0.4,0.3;0.5,0.3,0.2;0.7,0.2,0.1;0.9,0.1,0"


def _steps_overrides(recipe: str, steps: int):
  """--steps as config overrides: the recipe's variant applied to a config of N steps, its
  num_steps and prior_fraction passed on (a plain num_steps override would come after the
  variant and undo what it does to the steps, e.g. staged_long's prior steps on top)."""
  if not steps:
    return []
  from configs import ablations
  c = ablations.get_config("base")
  c.train.num_steps = steps
  ablations.VARIANTS[recipe](c)
  return [f"--config.train.num_steps={c.train.num_steps}",
          f"--config.train.prior_fraction={c.train.prior_fraction!r}"]


def run_sweep(a) -> int:
  """One `hvq sweep` over the recipes (with --steps, one per group of equal overrides)."""
  ev = (f"--images {a.corpus}/heldout --fit-images {a.corpus}/train --lmbdas {a.lmbda} "
        f"--ratios '{RATIOS}' --baselines jpeg --no-dists --no-fid --no-plots")
  groups = {}
  for r, seeds in _to_train(a):
    if seeds:
      groups.setdefault((tuple(_steps_overrides(r, a.steps)), tuple(seeds)), []).append(r)
  rc = 0
  for (overrides, seeds), recipes in groups.items():
    cmd = [sys.executable, "-m", "hvq_jax.cli", "sweep", "--config",
           os.path.join(ROOT, "configs", "ablations.py"), "--workdir", a.workdir,
           "--variants", ",".join(recipes), "--grid", "seed=" + ",".join(map(str, seeds)),
           "--eval", ev, "--config.data.source=folder",
           f"--config.data.train_dir={a.corpus}/train", f"--config.data.eval_dir={a.corpus}/heldout"]
    cmd += list(overrides)
    print("+", " ".join(cmd), flush=True)
    rc = rc or subprocess.run(cmd, cwd=ROOT).returncode
  return rc


def _rows(run_dir):
  from hvq_jax.evaluation import evaluate
  return evaluate.read_csv(os.path.join(run_dir, "eval", "results.csv"))


def _channel_shift(run_dir, rows, corpus):
  """Mean |mean_c(original) - mean_c(decoded)| per channel c over photos and settings:
  (the networks' decoded image, the same with the colour transform a format-4 file carries,
  `colour.fit` of that image: benchmarks/colour_effect.py)."""
  from benchmarks.colour_effect import channel_shift, recon_path
  from hvq_jax import colour, images
  out = []
  for r in rows:
    rec = images.read_image(recon_path(os.path.join(run_dir, "eval"), r))
    orig = images.read_image(os.path.join(corpus, "heldout", r["image"] + ".png"))
    out.append([channel_shift(rec, orig), channel_shift(colour.apply(rec, colour.fit(rec, orig)), orig)])
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


def _reused(a) -> dict:
  """The runs of earlier studies (--reuse, in order, later files winning) of this study's
  seeds, keyed (recipe, seed)."""
  out = {}
  for path in filter(None, a.reuse.split(",")):
    for key, r in json.load(open(path))["runs"].items():
      v, s = key.split("__seed=")
      if int(s) in a.seeds and v in RECIPES and v not in a.fresh:
        out[(v, int(s))] = dict(dir=path, rows=[], summary={}, **{k: r.get(k) for k in FIELDS})
  return out


def _extra_runs(a) -> dict:
  """--run RECIPE:SEED=DIR, as {(recipe, seed): DIR}."""
  out = {}
  for spec in a.run:
    key, _, d = spec.partition("=")
    v, _, s = key.partition(":")
    if v not in RECIPES or not s.isdigit() or not os.path.isfile(os.path.join(d, "eval", "summary.json")):
      raise SystemExit(f"--run {spec}: want RECIPE:SEED=DIR with RECIPE one of "
                       f"{', '.join(RECIPES)} and DIR/eval/summary.json present")
    out[(v, int(s))] = d
  return out


def _to_train(a):
  """(recipe, seeds) pairs --recipes x --seeds has to train: those no --reuse or --run gives."""
  have = set(_reused(a)) | set(_extra_runs(a))
  return [(v, [s for s in a.seeds if (v, s) not in have]) for v in a.recipes]


def _same_pixels_shift(runs, v, s, curve):
  """The colour shift of the run of seed s (not v) whose curve has the same PSNR and LPIPS."""
  key = lambda c: [(round(p["psnr"], 6), None if p["lpips"] is None else round(p["lpips"], 6))
                   for p in c]
  for (w, t), r in runs.items():
    if t == s and w != v and key(r["curve"]) == key(curve):
      return r["shift_rgb"], r.get("shift_rgb_colour")
  raise SystemExit(f"{v} seed {s}: its eval kept no reconstructions and no run of seed {s} "
                   "has the same PSNR and LPIPS at every setting to take the colour from")


def analyse(a) -> dict:
  runs = _reused(a)
  dirs = _extra_runs(a)
  for v in a.recipes:
    for s in a.seeds:
      d = os.path.join(a.workdir, f"{v}__seed={s}")
      if os.path.isfile(os.path.join(d, "eval", "summary.json")):
        dirs[(v, s)] = d
  for (v, s), d in dirs.items():
    rows = _rows(d)
    ours = [r for r in rows if r["method"] == "hvq"]
    summary = json.load(open(os.path.join(d, "eval", "summary.json")))
    curve = _curve(rows)
    shift = (_channel_shift(d, ours, a.corpus).tolist()
             if os.path.isdir(os.path.join(d, "eval", "recon")) else (None, None))
    runs[(v, s)] = dict(
        dir=d, rows=rows, summary=summary, curve=curve,
        saving=summary["hyperprior_saving_vs_static"],
        saving_per_photo=summary["saving_vs_static_per_image"],
        static_vs_fixed=summary["static_saving_vs_fixed_length"],
        shift_rgb=shift[0], shift_rgb_colour=shift[1],
        branches=summary["per_branch_bits_per_index"])
  for (v, s), r in runs.items():
    if r["shift_rgb"] is None:
      r["shift_rgb"], r["shift_rgb_colour"] = _same_pixels_shift(runs, v, s, r["curve"])
  old_jpeg = [json.load(open(p)).get("jpeg") for p in filter(None, a.reuse.split(","))]
  jpeg = next((_curve(r["rows"], "jpeg") for r in runs.values() if r["rows"]),
              next((j for j in old_jpeg if j), None))
  per_seed = {}
  for s in a.seeds:
    row = {}
    for v in STAGED:
      if (v, s) not in runs:
        continue
      st = runs[(v, s)]
      row[v] = dict(saving=st["saving"], shift_rgb=st["shift_rgb"])
      for other in ("hyperprior_off", "joint"):
        if (other, s) in runs:
          o = runs[(other, s)]
          row[v][f"bd_psnr_vs_{other}"] = _bd(o["curve"], st["curve"], "psnr")
          row[v][f"bd_lpips_vs_{other}"] = _bd(o["curve"], st["curve"], "lpips")
    if row:
      per_seed[s] = row
  return dict(runs=runs, per_seed=per_seed, jpeg=jpeg)


def _ms(vals):
  vals = [v for v in vals if v is not None]
  if not vals:
    return "-"
  return f"{np.mean(vals):+.1f}" + (f" ± {np.std(vals, ddof=1):.1f}" if len(vals) > 1 else "")


def report(a, res, wall) -> str:
  runs, per_seed = res["runs"], res["per_seed"]
  lines = ["# The recipe study", "",
           f"Corpus: {a.corpus} (docs/corpus.md); held-out photos coded whole at full size "
           f"to real files; lambda {a.lmbda}, ratios {RATIOS.replace(';', ' / ')}; seeds "
           f"{', '.join(map(str, a.seeds))}; {a.steps or 'config'} steps per run; "
           + ("tables made from finished runs (--analyse-only). " if a.analyse_only else
              f"wall time {wall / 3600:.1f} h on this machine. ")
           + "`±` is the sample standard deviation over seeds."
           + (f" Runs not trained here are read from {a.reuse.replace(',', ', ')}, with the configs of those studies."
              if a.reuse else "")
           + "".join(f" {RECIPES[v]}, seed {s}: the run folder {d}." for (v, s), d in _extra_runs(a).items()),
           ""] + ([a.note, ""] if a.note else []) + [
           "## Saving over the static histogram on the same indices (z and map included)", "",
           "| recipe | " + " | ".join(f"seed {s}" for s in a.seeds) + " | mean ± sd | photos: min .. max |",
           "|---|" + "---|" * (len(a.seeds) + 2)]
  for v, label in RECIPES.items():
    if v == "hyperprior_off" or not any((v, s) in runs for s in a.seeds):
      continue
    vals = [100 * runs[(v, s)]["saving"] if (v, s) in runs else None for s in a.seeds]
    photos = [100 * x for s in a.seeds if (v, s) in runs
              for x in runs[(v, s)]["saving_per_photo"].values()]
    spread = f"{min(photos):+.1f} .. {max(photos):+.1f}%" if photos else "-"
    lines.append(f"| {label} | " + " | ".join("-" if x is None else f"{x:+.1f}%" for x in vals)
                 + f" | {_ms(vals)}% | {spread} |")
  lines += ["", "## BD-rate of the staged recipes (negative: fewer bits at equal quality)", "",
            "| recipe | against | metric | " + " | ".join(f"seed {s}" for s in a.seeds)
            + " | mean ± sd |", "|---|---|---|" + "---|" * (len(a.seeds) + 1)]
  for v in STAGED:
    if not any((v, s) in runs for s in a.seeds):
      continue
    for other in ("hyperprior_off", "joint"):
      for m in ("psnr", "lpips"):
        vals = [per_seed.get(s, {}).get(v, {}).get(f"bd_{m}_vs_{other}") for s in a.seeds]
        lines.append(f"| {RECIPES[v]} | {RECIPES[other]} | {m.upper()} | "
                     + " | ".join("n/a" if x is None else f"{x:+.1f}%" for x in vals)
                     + f" | {_ms(vals)}% |")
  lines += ["", "## Colour: mean shift per channel (R, G, B; /255) over photos and settings", "",
            "The networks' decoded image, then (after ->) with the colour transform a format-4 "
            "file carries (hvq_jax/colour.py, fitted to that image; - where the run's "
            "reconstructions were not at hand).", "",
            "| recipe | " + " | ".join(f"seed {s}" for s in a.seeds) + " |",
            "|---|" + "---|" * len(a.seeds)]
  rgb = lambda x: "-" if x is None else "{:.1f} / {:.1f} / {:.1f}".format(*x)
  for v, label in RECIPES.items():
    if not any((v, s) in runs for s in a.seeds):
      continue
    lines.append(f"| {label} | " + " | ".join(
        "-" if (v, s) not in runs else
        f"{rgb(runs[(v, s)]['shift_rgb'])} -> {rgb(runs[(v, s)].get('shift_rgb_colour'))}"
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
  cols = [(v, s) for v in STAGED for s in a.seeds if (v, s) in runs]
  lines += ["", "## Saving per photo (staged recipes)", "",
            "| photo | " + " | ".join(f"{RECIPES[v]}, seed {s}" for v, s in cols) + " |",
            "|---|" + "---|" * len(cols)]
  names = sorted({n for c in cols for n in runs[c]["saving_per_photo"]})
  for n in names:
    lines.append(f"| {n} | " + " | ".join(
        f"{100 * runs[c]['saving_per_photo'][n]:+.1f}%" for c in cols) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--corpus", required=True, help="scripts/prepare_corpus.py's output")
  ap.add_argument("--workdir", required=True, help="run folders (not copied to --out)")
  ap.add_argument("--out", required=True, help="results folder, e.g. results/recipe")
  ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
  ap.add_argument("--recipes", type=lambda s: s.split(","), default=list(RECIPES),
                  help=f"comma-separated, of {', '.join(RECIPES)}")
  ap.add_argument("--reuse", default="", help="earlier studies' study.json, comma-separated: "
                  "their runs of --seeds join the tables and are not trained again")
  ap.add_argument("--fresh", type=lambda s: s.split(","), default=[],
                  help="recipes trained here even where --reuse has them (e.g. base after "
                  "the default config changed)")
  ap.add_argument("--run", action="append", default=[], metavar="RECIPE:SEED=DIR",
                  help="an evaluated run folder made otherwise, counted as that recipe's seed")
  ap.add_argument("--steps", type=int, default=0, help="steps per run (default: the config's)")
  ap.add_argument("--lmbda", default="0.2")
  ap.add_argument("--analyse-only", action="store_true")
  ap.add_argument("--note", default="", help="a paragraph for README.md after the first "
                  "(e.g. which reused runs had another config)")
  a = ap.parse_args(argv)
  a.corpus = os.path.abspath(a.corpus)
  unknown = sorted((set(a.recipes) | set(a.fresh)) - set(RECIPES))
  if unknown:
    ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
  for path in filter(None, a.reuse.split(",")):
    if not os.path.isfile(path):
      ap.error(f"--reuse {path}: no such study.json")
  _extra_runs(a)
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
              runs={f"{v}__seed={s}": {k: r[k] for k in FIELDS}
                    for (v, s), r in res["runs"].items()}, reuse=a.reuse, run=a.run, recipes=a.recipes,
              jpeg=res["jpeg"], ratios=RATIOS, lmbda=a.lmbda, seeds=a.seeds, steps=a.steps)
  json.dump(dump, open(os.path.join(a.out, "study.json"), "w"), indent=1)
  print(text)
  return rc


if __name__ == "__main__":
  sys.exit(main())
