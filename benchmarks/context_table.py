"""The prior-context ablation table from `hvq eval` summaries: bits per index and saving
against the static histogram, per stream and in total, one row per run.

  python benchmarks/context_table.py none=RUN/eval coarser=RUN2/eval ...

Per stream: the hyperprior file's bits per index (indices and that stream's z) and its
saving against the static histogram of the same indices, and with hyperprior.spatial
each pass's index bits per index; the mean file size; total: the eval's
`hyperprior_saving_vs_static` (whole files: map, z, indices and container).
"""
import argparse
import json
import os

from hvq_jax.layout import GRANULARITIES


def row(name: str, eval_dir: str) -> str:
  with open(os.path.join(eval_dir, "summary.json")) as f:
    s = json.load(f)
  b = s["per_branch_bits_per_index"]
  cells = []
  for g in GRANULARITIES:
    d = b[g]
    passes = "" if "passes_y" not in d else " [" + ", ".join(f"{v:.2f}" for v in d["passes_y"]) + "]"
    cells.append(f"{d['hyperprior_y'] + d['z']:.3f} / {d['static']:.3f} "
                 f"({100 * d['saving_vs_static']:+.1f}%){passes}")
  return (f"| {name} | " + " | ".join(cells)
          + f" | {s['bits_breakdown_mean']['file']:.0f}"
          + f" | **{100 * s['hyperprior_saving_vs_static']:+.1f}%** |")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("runs", nargs="+", help="NAME=EVAL_DIR")
  a = ap.parse_args()
  print("| prior | coarse bits/index (saving) [per pass] | medium | fine | mean file bits "
        "| total saving vs static |")
  print("| --- | --- | --- | --- | --- | --- |")
  for spec in a.runs:
    name, d = spec.split("=", 1)
    print(row(name, d))


if __name__ == "__main__":
  main()
