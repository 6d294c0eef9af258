"""Wall time of the codec commands as a user runs them: cold and warm caches, saved as JSON.

  python benchmarks/cli_latency.py --checkpoint runs/tiny_cpu [--repeats 5] [--label after]

Each figure is a fresh `python -m hvq_jax.cli ...` process (start-up, imports, loading the
checkpoint, compiling or loading programs, coding, writing the file), timed from outside:

- import: `python -c 'import hvq_jax.cli'`
- compress: `hvq compress IMAGE -o OUT.hvq --checkpoint DIR` (the trained lambda)
- compress_target: the same with `--target-bpp 0.2` (a rate search: several encodes)
- decompress: `hvq decompress OUT.hvq -o OUT.png --checkpoint DIR`

cold: a new, empty cache directory for every run (XDG_CACHE_HOME; JAX_COMPILATION_CACHE_DIR
unset), so everything compiles. warm: one cache directory that an untimed run of the
same command filled first; the processes run in a scratch folder, so the package comes from
the environment (installed, or PYTHONPATH). Besides wall time, each run's CPU time (user +
system, all threads) is kept: on a shared machine it varies far less than wall time.
The image is the 768x512 crop of the bundled retina photo
that benchmarks/codec.py codes (Kodak's size). Medians of --repeats runs; every run is
kept in the JSON, with the machine (cores, CPU, load average before and after: other
work on the machine slows every figure) and the versions.

Without --checkpoint a checkpoint is made first with `hvq train --config.train.num_steps=0`
(initial params: the same networks and shapes, so the same work per command, but other
bits per pixel, so --target-bpp may search differently than with a trained model).
The JSON keeps one entry per --label, so figures of two checkouts can sit side by side
(run the script from each, e.g. with PYTHONPATH pointing at the other checkout).
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _versions(cwd: str) -> dict:
  out = subprocess.run([sys.executable, "-c", "import jax, jaxlib, flax, orbax.checkpoint as o, "
                        "hvq_jax; print(jax.__version__, jaxlib.__version__, flax.__version__, "
                        "o.__version__, hvq_jax.__file__)"],
                       capture_output=True, text=True, check=True, cwd=cwd).stdout.split()
  return dict(jax=out[0], jaxlib=out[1], flax=out[2], orbax=out[3], hvq_jax=os.path.dirname(out[4]))


def _git_commit(path: str) -> str:
  r = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True,
                     text=True)
  dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--", "."],
                         capture_output=True, text=True).stdout.strip()
  return (r.stdout.strip() or "?") + ("+uncommitted" if dirty else "")


def _env(cache_home: str) -> dict:
  env = dict(os.environ, XDG_CACHE_HOME=cache_home, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("HVQ_NO_COMPILATION_CACHE", None)
  return env


def _cpu_children() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _run(argv, cache_home: str, cwd: str):
  """(wall seconds, CPU seconds: user + system of the process and its threads)."""
  c, t = _cpu_children(), time.perf_counter()
  r = subprocess.run(argv, env=_env(cache_home), capture_output=True, text=True, cwd=cwd)
  dt, dc = time.perf_counter() - t, _cpu_children() - c
  if r.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
  return dt, dc


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", default=None, help="training workdir (default: make one)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--target-bpp", type=float, default=0.2)
  ap.add_argument("--label", default="current")
  ap.add_argument("--commands", default="import,compress,compress_target,decompress")
  ap.add_argument("--out", default="benchmarks/results/cli_latency_cpu.json")
  a = ap.parse_args()

  work = tempfile.mkdtemp(prefix="hvq_cli_latency_")
  hvq = [sys.executable, "-m", "hvq_jax.cli"]
  try:
    load_before = os.getloadavg()
    ckpt = a.checkpoint and os.path.abspath(a.checkpoint)
    if ckpt is None:
      ckpt = os.path.join(work, "ckpt")
      subprocess.run(hvq + ["train", "--workdir", ckpt, "--config.train.num_steps=0",
                            "--progress=false"], check=True, env=_env(os.path.join(work, "c0")),
                     stdout=subprocess.DEVNULL, cwd=work)
    from PIL import Image
    from hvq_jax import images
    img = images.bundled_photo("retina")[300:812, 300:1068]
    assert img.shape == (512, 768, 3)
    png = os.path.join(work, "retina_768x512.png")
    Image.fromarray(img).save(png)
    hvq_file = os.path.join(work, "ref.hvq")
    _run(hvq + ["compress", png, "-o", hvq_file, "--checkpoint", ckpt],
         os.path.join(work, "prime"), work)
    commands = {
        "import": [sys.executable, "-c", "import hvq_jax.cli"],
        "compress": hvq + ["compress", png, "-o", os.path.join(work, "o.hvq"), "--checkpoint", ckpt],
        "compress_target": hvq + ["compress", png, "-o", os.path.join(work, "t.hvq"),
                                  "--checkpoint", ckpt, "--target-bpp", str(a.target_bpp)],
        "decompress": hvq + ["decompress", hvq_file, "-o", os.path.join(work, "d.png"),
                             "--checkpoint", ckpt],
    }
    results = {}
    for name in a.commands.split(","):
      argv = commands[name]
      cold = []
      for i in range(a.repeats):
        d = os.path.join(work, f"cold_{name}_{i}")
        cold.append(_run(argv, d, work))
        shutil.rmtree(d, ignore_errors=True)
      warm_dir = os.path.join(work, f"warm_{name}")
      _run(argv, warm_dir, work)   # fills the cache
      warm = [_run(argv, warm_dir, work) for _ in range(a.repeats)]
      med = lambda runs, i: statistics.median(r[i] for r in runs)
      results[name] = dict(cold_s=med(cold, 0), warm_s=med(warm, 0),
                           cold_cpu_s=med(cold, 1), warm_cpu_s=med(warm, 1),
                           cold_runs_s=[r[0] for r in cold], warm_runs_s=[r[0] for r in warm],
                           cold_runs_cpu_s=[r[1] for r in cold],
                           warm_runs_cpu_s=[r[1] for r in warm])
      r = results[name]
      print(f"{name:16s} cold {r['cold_s']:6.2f} s (cpu {r['cold_cpu_s']:6.2f})   warm "
            f"{r['warm_s']:6.2f} s (cpu {r['warm_cpu_s']:6.2f})   runs: cold "
            f"{', '.join(f'{v:.2f}' for v in r['cold_runs_s'])}; warm "
            f"{', '.join(f'{v:.2f}' for v in r['warm_runs_s'])}", flush=True)
    load_after = os.getloadavg()
    hvq_dir = _versions(work)
    entry = dict(
        commit=_git_commit(hvq_dir["hvq_jax"]), when=time.strftime("%Y-%m-%d %H:%M:%S"),
        repeats=a.repeats, checkpoint=a.checkpoint or "hvq train --config.train.num_steps=0",
        image="retina crop 768x512 (benchmarks/codec.py's)", target_bpp=a.target_bpp,
        machine=dict(cpu_count=os.cpu_count(),
                     usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                     cpu=_cpu_model(), platform=platform.platform(),
                     python=platform.python_version(),
                     load_average_before=list(load_before), load_average_after=list(load_after)),
        versions={k: v for k, v in hvq_dir.items() if k != "hvq_jax"},
        results=results)
  finally:
    shutil.rmtree(work, ignore_errors=True)

  print(f"\n{'command':16s} {'cold s':>8s} {'warm s':>8s} {'cold cpu':>9s} {'warm cpu':>9s}   "
        f"({a.label}, {entry['commit']}, {entry['machine']['cpu_count']} cores, load "
        f"{load_before[0]:.1f} -> {load_after[0]:.1f})")
  for name, r in results.items():
    print(f"{name:16s} {r['cold_s']:8.2f} {r['warm_s']:8.2f} {r['cold_cpu_s']:9.2f} "
          f"{r['warm_cpu_s']:9.2f}")
  doc = {}
  if os.path.exists(a.out):
    with open(a.out) as f:
      doc = json.load(f)
  doc.setdefault("what", "wall seconds of one `hvq` process per command (benchmarks/cli_latency.py)")
  doc.setdefault("runs", {})[a.label] = entry
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(doc, f, indent=1)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
