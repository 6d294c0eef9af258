"""Copies the evals' summaries here and prints the tables of README.md: per seed, the
staged_long run's own prior (480 steps, checkerboard) against fresh priors of STEPS steps.

  python results/prior_length/collect.py [--steps 1440]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
NAMES = dict(reference="staged_long's own prior (checkerboard, 480 steps)",
             checkerboard="fresh prior, checkerboard, {n} steps",
             quad="fresh prior, quad, {n} steps")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=1440)
  ap.add_argument("--runs", default="/work/runs/prior_length")
  ap.add_argument("--source", default="/work/runs/recipe_long")
  a = ap.parse_args()
  os.makedirs(os.path.join(HERE, "summaries"), exist_ok=True)
  totals = {}
  for s in (0, 1, 2):
    runs = {"reference": f"{a.source}/staged_long__seed={s}/eval"}
    runs.update({arm: f"{a.runs}/seed{s}_{arm}_{a.steps}/eval" for arm in ("checkerboard", "quad")})
    runs = {k: v for k, v in runs.items() if os.path.exists(os.path.join(v, "summary.json"))}
    if len(runs) < 2:
      continue
    print(f"\n**staged_long__seed={s}**\n")
    args = []
    for arm, d in runs.items():
      shutil.copy(os.path.join(d, "summary.json"),
                  os.path.join(HERE, "summaries", f"seed{s}_{arm}.json"))
      args.append(f"{NAMES[arm].format(n=a.steps)}={d}")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "context_table.py")]
                         + args, capture_output=True, text=True, check=True).stdout
    print(out, end="")
    print("\n| prior | saving per photo (min .. max) | " + " | ".join(
        k.split("ratios=")[1] for k in json.load(open(os.path.join(
            runs["reference"], "summary.json")))["saving_vs_static_per_setting"]) + " |")
    print("| --- | --- |" + " --- |" * 6)
    for arm, d in runs.items():
      sm = json.load(open(os.path.join(d, "summary.json")))
      per = np.array(list(sm["saving_vs_static_per_image"].values()))
      totals.setdefault(arm, []).append(sm["hyperprior_saving_vs_static"])
      print(f"| {NAMES[arm].format(n=a.steps)} | {100 * per.min():+.1f} .. {100 * per.max():+.1f}% | "
            + " | ".join(f"{100 * v:+.1f}%" for v in sm["saving_vs_static_per_setting"].values())
            + " |")
  print("\n**over seeds**\n")
  for arm, v in totals.items():
    v = 100 * np.array(v)
    sd = f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
    print(f"- {NAMES[arm].format(n=a.steps)}: {v.mean():+.1f}%{sd} "
          f"(seeds {', '.join(f'{x:+.1f}' for x in v)})")


if __name__ == "__main__":
  main()
