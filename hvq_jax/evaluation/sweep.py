"""`hvq sweep`: expand a grid (or named variants), train + evaluate each run, one table.

Runs are local subprocesses one after another (`hvq train`, then `hvq eval`), or, with
`--print-only`, the commands to paste into the TPU/SLURM launch scripts. A run whose
`eval/summary.json` exists is skipped, so re-running a sweep finishes what is missing.
Outputs in WORKDIR: `table.csv`, `table.md` (one row per run and setting, with the
hyperprior's saving over the static histogram), `branches.csv`/`.md` (bits per index of
each stream: granularity, or residual-VQ stage), `pairs.csv`/`.md` (every two runs against
each other: BD-rate where their PSNR ranges overlap, Pareto dominance of their points, and the
pure bit ratio where both decode to the same pixels, as a plug-in prior and its tokenizer do)
and `rd_*.png/svg` across runs.
"""
import csv
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple


def split_top(s: str, sep: str = ",") -> List[str]:
  """Split on `sep` outside parentheses/brackets: '1,(2,3)' -> ['1', '(2,3)']."""
  out, depth, cur = [], 0, ""
  for ch in s:
    depth += ch in "([" 
    depth -= ch in ")]"
    if ch == sep and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  out.append(cur)
  return [x.strip() for x in out if x.strip()]


def expand_grid(grid: str) -> List[Dict[str, str]]:
  """'a.b=1,2 c=(0.1,0.2)' -> [{'a.b': '1', 'c': '(0.1,0.2)'}, {'a.b': '2', ...}]."""
  fields = []
  for item in shlex.split(grid):
    if "=" not in item:
      raise ValueError(f"grid item {item!r} is not FIELD=V1,V2,...")
    k, v = item.split("=", 1)
    fields.append((k, split_top(v)))
  if not fields:
    return [{}]
  keys = [k for k, _ in fields]
  return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in fields])]


def run_name(variant: str, overrides: Dict[str, str]) -> str:
  parts = [variant] if variant else []
  parts += [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
  name = "__".join(parts) or "base"
  return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in name)


def _hyperprior_off(config: str, variant: str, overrides: Dict[str, str], extra) -> bool:
  """Does this run train without the hyperprior (a tokenizer a plug-in prior can serve)?"""
  flags = {k: v for k, v in overrides.items()}
  flags.update(dict(x[len("--config."):].split("=", 1) for x in extra if "=" in x))
  if "model.hyperprior.enabled" in flags:
    return flags["model.hyperprior.enabled"].strip().lower() in ("false", "0")
  import importlib.util
  spec = importlib.util.spec_from_file_location("sweep_cfg", config)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(variant) if variant else mod.get_config()
  return not c.model.hyperprior.enabled


def plan(config: str, workdir: str, variants: Sequence[str], grid: str,
         extra: Sequence[str], plug_in: bool = False, plug_in_steps: int = 0,
         eval_extra: Sequence[str] = (), plug_in_set: Sequence[str] = ()
         ) -> List[Tuple[str, List[str], List[str]]]:
  """[(run dir, train argv, eval argv)]. With `plug_in`, every run trained without the
  hyperprior is followed by `RUN__plug_in`: its tokenizer (encoder, codebooks, decoder)
  frozen from that run and only a hyperprior trained on the rate (the plug-in
  prior: identical indices and reconstructions, fewer bits); `plug_in_set` ('field=value')
  are overrides for the plug-in runs only (e.g. model.hyperprior.context=coarser)."""
  runs = []
  ev_args = lambda d: ["eval", "--checkpoint", d, "--out", os.path.join(d, "eval"),
                       "--no-progress", "--baselines", ""] + list(eval_extra)
  for variant in (variants or [""]):
    cfg = f"{config}:{variant}" if variant else config
    for ov in expand_grid(grid or ""):
      d = os.path.join(workdir, run_name(variant, ov))
      train = ["train", "--config", cfg, "--workdir", d, "--noprogress"] + \
          [f"--config.{k}={v}" for k, v in ov.items()] + list(extra)
      runs.append((d, train, ev_args(d)))
      if plug_in and _hyperprior_off(config, variant, ov, extra):
        dp = d + "__plug_in"
        tp = [a for a in train if not a.startswith("--config.model.hyperprior.enabled=")]
        tp[tp.index("--workdir") + 1] = dp
        tp += ["--config.model.hyperprior.enabled=True", f"--config.train.init_from={d}",
               "--config.train.trainable=prior"]
        if plug_in_steps:
          tp.append(f"--config.train.num_steps={plug_in_steps}")
        tp += [f"--config.{kv}" for kv in plug_in_set]
        runs.append((dp, tp, ev_args(dp)))
  return runs


def _write_table(rows: List[Dict], fields: Sequence[str], path_stem: str) -> None:
  with open(path_stem + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
  with open(path_stem + ".md", "w") as f:
    f.write("| " + " | ".join(fields) + " |\n|" + "---|" * len(fields) + "\n")
    for r in rows:
      f.write("| " + " | ".join(fmt(r.get(k)) for k in fields) + " |\n")


def collect(workdir: str, run_dirs: Sequence[str]) -> List[Dict]:
  rows, branch_rows = [], []
  for d in run_dirs:
    p = os.path.join(d, "eval", "summary.json")
    if not os.path.isfile(p):
      continue
    with open(p) as f:
      s = json.load(f)
    per_setting = s.get("saving_vs_static_per_setting", {})
    for pt in s["curves"].get("hvq", []):
      rows.append(dict(run=os.path.basename(d), setting=pt["setting"], bpp=pt["bpp"],
                       psnr=pt["psnr"], ms_ssim=pt["ms_ssim"], lpips=pt["lpips"],
                       saving_vs_static=per_setting.get(pt["setting"]),
                       run_saving_vs_static=s["hyperprior_saving_vs_static"]))
    for b, v in s.get("per_branch_bits_per_index", {}).items():
      branch_rows.append(dict(run=os.path.basename(d), branch=b, **v))
  _write_table(rows, ["run", "setting", "bpp", "psnr", "ms_ssim", "lpips", "saving_vs_static",
                      "run_saving_vs_static"], os.path.join(workdir, "table"))
  _write_table(branch_rows, ["run", "branch", "indices", "hyperprior_y", "z", "static",
                             "saving_vs_static", "gaussian_y", "chosen_mahalanobis_rms",
                             "log2_sigma", "chosen_is_mode"], os.path.join(workdir, "branches"))
  _write_table(compare(rows), PAIR_FIELDS, os.path.join(workdir, "pairs"))
  return rows


PAIR_FIELDS = ["run_a", "run_b", "bd_rate_psnr_b_vs_a", "bd_rate_lpips_b_vs_a",
               "a_points_dominated_by_b",
               "b_points_dominated_by_a", "same_pixels", "bits_ratio_b_over_a"]


def _dominated(p: Dict, q: Dict) -> bool:
  """q is at least as good as p on both axes and better on one (fewer bits, higher PSNR)."""
  return q["bpp"] <= p["bpp"] and q["psnr"] >= p["psnr"] and (q["bpp"] < p["bpp"] or
                                                                q["psnr"] > p["psnr"])


def _bd(bd_rate, pa, pb, metric: str):
  """BD-rate of run b against run a at equal `metric`; None where it is not defined."""
  a = [p for p in pa if p.get(metric) is not None]
  b = [p for p in pb if p.get(metric) is not None]
  try:
    return bd_rate.bd_rate([p["bpp"] for p in a], [p[metric] for p in a],
                           [p["bpp"] for p in b], [p[metric] for p in b])
  except ValueError:
    return None


def compare(rows: Sequence[Dict], same_psnr_db: float = 0.01) -> List[Dict]:
  """Every two runs of a sweep against each other, from their table rows.

  "Left of" is decided by Pareto dominance of the measured points (no fitted curve can
  flatter a run). BD-rate (PSNR and LPIPS, pchip) only where the two ranges overlap: models that
  did not learn lambda conditioning give near-constant PSNR and no shared interval. Two runs
  with the same settings and PSNR within `same_psnr_db` at each decode to the same pixels
  (a plug-in prior on its source tokenizer): then the mean bits ratio is the pure saving.
  """
  from hvq_jax.evaluation import bd_rate
  by_run: Dict[str, List[Dict]] = {}
  for r in rows:
    if r.get("bpp") is not None and r.get("psnr") is not None:
      by_run.setdefault(r["run"], []).append(r)
  out = []
  names = list(by_run)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      pa, pb = by_run[a], by_run[b]
      bd = {m: _bd(bd_rate, pa, pb, m) for m in ("psnr", "lpips")}
      sa, sb = {p["setting"]: p for p in pa}, {p["setting"]: p for p in pb}
      same = set(sa) == set(sb) and all(abs(sa[k]["psnr"] - sb[k]["psnr"]) <= same_psnr_db
                                        for k in sa)
      ratio = (sum(sb[k]["bpp"] / sa[k]["bpp"] for k in sa) / len(sa)) if same else None
      out.append(dict(run_a=a, run_b=b, bd_rate_psnr_b_vs_a=bd["psnr"],
                      bd_rate_lpips_b_vs_a=bd["lpips"],
                      a_points_dominated_by_b=f"{sum(any(_dominated(p, q) for q in pb) for p in pa)}/{len(pa)}",
                      b_points_dominated_by_a=f"{sum(any(_dominated(q, p) for p in pa) for q in pb)}/{len(pb)}",
                      same_pixels=same, bits_ratio_b_over_a=ratio))
  return out


def main(argv):
  import argparse
  ap = argparse.ArgumentParser(prog="hvq sweep")
  ap.add_argument("--config", required=True, help="config file (with get_config(NAME) for --variants)")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--variants", default="", help="comma-separated names for get_config(NAME)")
  ap.add_argument("--grid", default="", help="'field=v1,v2 other.field=a,b' (cartesian product)")
  ap.add_argument("--print-only", action="store_true", help="print the commands, run nothing")
  ap.add_argument("--plug-in", action="store_true",
                  help="after each hyperprior-off run, train a plug-in hyperprior on its frozen tokenizer")
  ap.add_argument("--plug-in-steps", type=int, default=0, help="steps of the plug-in runs (default: the config's)")
  ap.add_argument("--plug-in-set", action="append", default=[], metavar="FIELD=VALUE",
                  help="a config override for the plug-in runs only (repeatable), e.g. "
                       "model.hyperprior.context=coarser")
  ap.add_argument("--lpips-weights", default=None, help="passed to hvq eval (LPIPS column)")
  ap.add_argument("--eval", default="", metavar="ARGS",
                  help="more arguments for every run's hvq eval, e.g. \"--images DIR "
                       "--fit-images DIR --ratios '0.1,0.4,0.5;0.3,0.4,0.3'\"")
  a, extra = ap.parse_known_args(argv)   # --config.field=value overrides for every run
  bad = [x for x in extra if not x.startswith("--config.")]
  if bad:
    ap.error(f"unrecognized arguments: {' '.join(bad)}")
  a.extra = extra
  try:
    eval_extra = (["--lpips-weights", a.lpips_weights] if a.lpips_weights else []) + \
        shlex.split(a.eval)
    runs = plan(a.config, a.workdir, split_top(a.variants), a.grid, a.extra, a.plug_in,
                a.plug_in_steps, eval_extra, a.plug_in_set)
  except ValueError as e:
    sys.exit(f"hvq sweep: {e}")
  if a.print_only:
    for _, t, e in runs:
      print("hvq " + shlex.join(t))
      print("hvq " + shlex.join(e))
    return 0
  os.makedirs(a.workdir, exist_ok=True)
  failed = []
  for i, (d, t, e) in enumerate(runs):
    if os.path.isfile(os.path.join(d, "eval", "summary.json")):
      print(f"[{i + 1}/{len(runs)}] {d}: done, skipped")
      continue
    src = [x.split("=", 1)[1] for x in t if x.startswith("--config.train.init_from=")]
    if src and src[0] in failed:
      failed.append(d)
      print(f"[{i + 1}/{len(runs)}] {d}: skipped, its tokenizer run {src[0]} failed", file=sys.stderr)
      continue
    print(f"[{i + 1}/{len(runs)}] {d}")
    for argv_ in (t, e):
      r = subprocess.run([sys.executable, "-m", "hvq_jax.cli"] + argv_)
      if r.returncode:
        failed.append(d)
        print(f"hvq sweep: {d} failed ({argv_[0]}, exit {r.returncode})", file=sys.stderr)
        break
  rows = collect(a.workdir, [d for d, _, _ in runs])
  done = [d for d, _, _ in runs if os.path.isfile(os.path.join(d, "eval", "summary.json"))]
  if done:
    from hvq_jax.evaluation import plots
    plots.rd_plots([os.path.join(d, "eval") for d in done], a.workdir, include_published=False)
  print(f"wrote {a.workdir}/table.csv, table.md ({len(rows)} rows)")
  return 1 if failed else 0
