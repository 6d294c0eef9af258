"""Encode/decode time of a 768x512 image and entropy-coder throughput, saved as JSON;
with --sizes, time and peak memory per megapixel from 0.06 to 24 MP, saved and plotted.

  python benchmarks/codec.py --checkpoint runs/tiny_cpu [--repeats 3]
  python benchmarks/codec.py --checkpoint runs/tiny_cpu --sizes [--max-gb 10]
  python benchmarks/codec.py --config default --sizes       # random-init default model

--sizes codes each size in fresh processes, one at a time: one compiles the programs
into the executable cache, then one encodes and one decodes, twice each; the second call
is reported (the first loads the programs). Peak memory is the second call's: after the
first, freed heap memory is returned to the system (malloc_trim) and VmHWM is reset;
the peak less the resident size then is what coding one image holds, not the runtime,
the programs or the model.
The image is the held-out photo `coffee` (600x400) mirrored into tiles to the size:
every pixel has a real photo's local statistics (the cost of coding does not depend on
content, the bits do). A size whose estimated memory (codec/memory.py) is over --max-gb
is skipped and recorded as such.

The image is a 768x512 crop of the bundled retina photo (Kodak's size; Kodak itself is
not bundled). Times are split into model (networks, incl. hyper-synthesis), pmf
(integer index weights, entropy/integer.py) and range_coding (constriction; in
the encoder the walk that collects streams is counted under pmf). The first call of
each direction compiles; it is reported separately and excluded from the steady times.
"""
import argparse
import json
import os
import time

import numpy as np
import jax

from hvq_jax import codec
from hvq_jax.codec import profile
from hvq_jax import images


SIZES = "256x256,512x512,768x1024,1024x1536,1536x2048,2048x3072,3024x4032,4000x6000"


def _load(checkpoint: str, config: str):
  if checkpoint:
    return codec.load_model(checkpoint)
  from hvq_jax.configs import default, tiny_cpu
  from hvq_jax.nn import model as model_lib
  cfg = {"default": default, "tiny": tiny_cpu}[config].get_config()
  mdl = model_lib.build(cfg.model)
  return codec.CodecModel(cfg, model_lib.init_params(mdl, jax.random.PRNGKey(0)))


def _photo(h: int, w: int) -> np.ndarray:
  """The held-out photo mirrored into tiles to h x w."""
  a = images.bundled_photo("coffee")
  tile = np.concatenate([a, a[:, ::-1]], 1)
  tile = np.concatenate([tile, tile[::-1]], 0)
  reps = (-(-h // tile.shape[0]), -(-w // tile.shape[1]), 1)
  return np.ascontiguousarray(np.tile(tile, reps)[:h, :w])


def reset_peak() -> int:
  """Freed heap back to the system and VmHWM := VmRSS; returns that resident size, so that
  VmHWM less it is what the work after this call holds at its peak."""
  import ctypes
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return proc_status("VmRSS")


def proc_status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  return 0


def _one(a) -> dict:
  """In a fresh process: code (or decode) one size twice; seconds and peak bytes."""
  from hvq_jax import compile_cache
  compile_cache.enable()
  model = _load(a.checkpoint, a.config)
  h, w = (int(v) for v in a.one.split("x"))
  img, data = _photo(h, w), None
  if a.direction == "decode":
    with open(a.file, "rb") as f:
      data = f.read()
  times, stages = [], []
  for i in range(1 if a.direction == "compile" else 2):
    if i == 1:   # the second call alone: the first loaded the programs
      base = reset_peak()
    t = time.perf_counter()
    if a.direction in ("encode", "compile"):
      out, st = profile.compress(model, img)
      stages.append(st["seconds"])
      if a.direction == "compile":
        with open(a.file, "wb") as f:
          f.write(out)
        codec.decompress(model, out)
    else:
      stages.append(profile.decompress(model, data)[1])
    times.append(time.perf_counter() - t)
  if a.direction == "compile":
    return {}
  return dict(seconds=times[1], first_seconds=times[0], stages=stages[1],
              peak_bytes=proc_status("VmHWM") - base, hwm_bytes=proc_status("VmHWM"), base_bytes=base,
              bytes=len(out) if a.direction != "decode" else len(data))


def _sizes(a) -> None:
  import subprocess
  import sys
  import tempfile
  from hvq_jax import layout
  from hvq_jax.codec import memory
  model = _load(a.checkpoint, a.config)
  name = os.path.basename(os.path.normpath(a.checkpoint)) if a.checkpoint else a.config
  out = a.out if a.out != "benchmarks/results/codec.json" else \
      f"benchmarks/results/codec_sizes_{name}.json"
  rows = []
  tmp = tempfile.mkdtemp(prefix="hvq-sizes-")
  for hw in a.sizes.split(","):
    h, w = (int(v) for v in hw.split("x"))
    est = memory.memory_estimate(model.cfg, *layout.padded_size(h, w, model.cfg.strides[0]))
    row = dict(size=hw, megapixels=h * w / 1e6, estimate_bytes=dict(
        encode=est["encode"], decode=est["decode"]))
    if max(est["encode"], est["decode"]) > a.max_gb * 2 ** 30:
      row["skipped"] = f"estimated {max(est['encode'], est['decode']) / 2 ** 30:.1f} GiB > --max-gb"
      rows.append(row)
      print(json.dumps(row), flush=True)
      continue
    f = os.path.join(tmp, f"{hw}.hvq")
    for d in ("compile", "encode", "decode"):
      cmd = [sys.executable, os.path.abspath(__file__), "--one", hw, "--direction", d,
             "--file", f, "--config", a.config]
      if a.checkpoint:
        cmd += ["--checkpoint", a.checkpoint]
      r = subprocess.run(cmd, capture_output=True, text=True)
      if r.returncode:
        row[d] = dict(error=(r.stderr.strip().splitlines() or ["?"])[-1])
        break
      if d != "compile":
        row[d] = json.loads(r.stdout.strip().splitlines()[-1])
    for d in ("encode", "decode"):
      if "seconds" in row.get(d, {}):
        row[d]["seconds_per_mp"] = row[d]["seconds"] / row["megapixels"]
        row[d]["peak_mb_per_mp"] = row[d]["peak_bytes"] / 1e6 / row["megapixels"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = dict(model=a.checkpoint or f"{a.config} (random init, seed 0)", image=
                "held-out photo coffee, mirror-tiled", backend=jax.default_backend(),
                cores=len(os.sched_getaffinity(0)), load_average=os.getloadavg(), rows=rows)
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  _plot(result, out[:-5] + ".png")
  print(f"wrote {out} and {out[:-5]}.png")


def _plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for d, style in (("encode", "o-"), ("decode", "s-")):
    pts = [(r["megapixels"], r[d]) for r in result["rows"] if "seconds" in r.get(d, {})]
    if pts:
      ax1.plot([p for p, _ in pts], [v["seconds_per_mp"] for _, v in pts], style, label=d)
      ax2.plot([p for p, _ in pts], [v["peak_mb_per_mp"] for _, v in pts], style, label=d)
  for ax, label in ((ax1, "seconds per megapixel"), (ax2, "peak MB per megapixel")):
    ax.set_xscale("log")
    ax.set_xlabel("megapixels")
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.suptitle(f"{result['model']}: {result['cores']} CPU cores")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", default="")
  ap.add_argument("--config", default="tiny", choices=("tiny", "default"),
                  help="without --checkpoint: this config with random-init params")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results/codec.json")
  ap.add_argument("--sizes", nargs="?", const=SIZES, default=None,
                  help=f"HxW,... (default {SIZES})")
  ap.add_argument("--max-gb", type=float, default=10.0,
                  help="--sizes: skip sizes whose estimated memory is over this (GiB)")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--direction", default="encode", help=argparse.SUPPRESS)
  ap.add_argument("--file", default="", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.one:
    print(json.dumps(_one(a)))
    return
  if a.sizes:
    _sizes(a)
    return
  model = _load(a.checkpoint, a.config)
  img = images.bundled_photo("retina")[300:812, 300:1068]
  assert img.shape == (512, 768, 3)

  t = time.perf_counter(); data = codec.compress(model, img); first_enc = time.perf_counter() - t
  t = time.perf_counter(); codec.decompress(model, data); first_dec = time.perf_counter() - t
  enc, dec = [], []
  for _ in range(a.repeats):
    t = time.perf_counter()
    data, st = profile.compress(model, img)
    enc.append(dict(st["seconds"], symbols=st["symbols"], total=time.perf_counter() - t))
    t = time.perf_counter()
    _, seconds = profile.decompress(model, data)
    dec.append(dict(seconds, total=time.perf_counter() - t))
  med = lambda rows, k: float(np.median([r.get(k, 0.0) for r in rows]))
  symbols = enc[0]["symbols"]
  result = dict(
      image="retina crop 768x512", checkpoint=a.checkpoint, backend=jax.default_backend(),
      device=str(jax.devices()[0]), bytes=len(data), bpp=8 * len(data) / img[..., 0].size,
      symbols=int(symbols),
      first_call_s=dict(encode=first_enc, decode=first_dec),
      encode_s={k: med(enc, k) for k in ("total", "model", "pmf", "range_coding")},
      decode_s={k: med(dec, k) for k in ("total", "model", "pmf", "range_coding")},
  )
  # the target: integer PMFs and range coding <= 10% of encode and of decode time
  result["pmf_and_range_coding_share"] = {
      d: (result[f"{d}_s"]["pmf"] + result[f"{d}_s"]["range_coding"]) / result[f"{d}_s"]["total"]
      for d in ("encode", "decode")}
  result["range_coder_symbols_per_s"] = dict(
      encode=symbols / max(result["encode_s"]["range_coding"], 1e-9),
      decode=symbols / max(result["decode_s"]["range_coding"], 1e-9))
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
