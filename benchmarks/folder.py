"""Folder throughput: `hvq compress/decompress FOLDER` one image at a time against worker
processes, in images per second, saved as JSON.

  python benchmarks/folder.py --checkpoint runs/tiny_cpu [--n 16] [--size 512x768]

The folder holds `n` different crops of the shipped and bundled photos. Each command runs
as a whole process, as a user runs it (start-up, model load, coding, writing), once to
fill the executable cache and then timed (the best of --repeats); --jobs 1 codes in the
command's own process (XLA uses every core on each image), --jobs 0 starts one worker
per core.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from hvq_jax import images


def _crops(n: int, h: int, w: int):
  photos = list(images.bundled_photos("heldout").values()) + list(images.demo_photos().values())
  photos += [images.bundled_photo(p) for p in ("retina", "astronaut", "rocket")]
  out = []
  for i in range(n):
    a = photos[i % len(photos)]
    rep = (-(-h // a.shape[0]), -(-w // a.shape[1]), 1)
    a = np.tile(a, rep)           # small photos repeat; each crop starts elsewhere
    y, x = (7 * i) % (a.shape[0] - h + 1), (13 * i) % (a.shape[1] - w + 1)
    out.append(np.ascontiguousarray(a[y:y + h, x:x + w]))
  return out


def _differing(checkpoint: str, one: str, many: str) -> dict:
  """{file: {stream: indices that differ}} between the two folders' files. A worker codes
  on its share of the cores, and XLA's float sums over fewer threads can round otherwise,
  so the encoder may pick the other of two entries within rounding; the files still
  decode the same on every decoder."""
  from hvq_jax import codec
  model, out = None, {}
  for f in sorted(os.listdir(one)):
    x, y = (open(os.path.join(d, f), "rb").read() for d in (one, many))
    if x == y:
      continue
    model = model or codec.load_model(checkpoint)
    (_, ix, gx), (_, iy, gy) = codec.decode_indices(model, x), codec.decode_indices(model, y)
    out[f] = dict(map=int((gx != gy).sum()),
                  **{k: int((ix[k] != iy[k]).sum()) for k in ix}, of=int(sum(v.size for v in ix.values())))
  return out


def _timed(cmd):
  t = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode:
    sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--n", type=int, default=16)
  ap.add_argument("--size", default="512x768")
  ap.add_argument("--repeats", type=int, default=2, help="timed runs per command (the best)")
  ap.add_argument("--out", default="benchmarks/results/folder_cpu.json")
  a = ap.parse_args()
  h, w = (int(v) for v in a.size.split("x"))
  tmp = tempfile.mkdtemp(prefix="hvq-folder-")
  src = os.path.join(tmp, "in")
  os.makedirs(src)
  for i, img in enumerate(_crops(a.n, h, w)):
    Image.fromarray(img).save(os.path.join(src, f"{i:02d}.png"))
  hvq = [sys.executable, "-m", "hvq_jax.cli"]
  rows = {}
  for jobs in ("1", "0"):
    for cmd, inp, ext in (("compress", src, "hvq"), ("decompress", None, "png")):
      inp = inp or os.path.join(tmp, "hvq_1")
      out = os.path.join(tmp, f"{ext}_{jobs}")
      run = hvq + [cmd, inp, "-o", out, "--checkpoint", a.checkpoint, "--no-progress",
                   "--jobs", jobs]
      _timed(run)                    # fills the executable cache
      s = min(_timed(run) for _ in range(a.repeats))
      rows[f"{cmd} --jobs {jobs}"] = dict(seconds=s, images_per_s=a.n / s)
      print(cmd, "--jobs", jobs, f"{s:.1f} s, {a.n / s:.2f} images/s", flush=True)
  differ = _differing(a.checkpoint, os.path.join(tmp, "hvq_1"), os.path.join(tmp, "hvq_0"))
  result = dict(checkpoint=a.checkpoint, n=a.n, size=a.size, cores=len(os.sched_getaffinity(0)),
                load_average=os.getloadavg(), files_identical=not differ,
                files_differing=differ, rows=rows)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
