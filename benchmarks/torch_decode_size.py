"""Large files decoded by PyTorch against the JAX decoder: indices and map (the export's
tables through the codec's own walk: bit-identical to JAX's or refused by the symbol
digest; compared here anyway), pixels (largest difference and how many differ), seconds
and peak memory of each decoder, saved as JSON.

  hvq export --checkpoint runs/tiny_cpu --format torch --out model.safetensors
  python benchmarks/torch_decode_size.py --checkpoint runs/tiny_cpu --export model.safetensors \
      --files big1.hvq big2.hvq --out benchmarks/results/torch_decode_sizes_demo.json

Each decode runs in its own process, so its peak (VmHWM, less the resident size before
decoding) is that decoder's alone; JAX's seconds include compiling its decoder (one call
per process, no executable cache), PyTorch's are eager.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.codec import proc_status, reset_peak  # noqa: E402


def _child(a) -> None:
  """Decode one file with one backend; write image, indices and figures to a .npz."""
  import time
  data = open(a.file, "rb").read()
  if a.backend == "jax":
    from hvq_jax import codec
    model = codec.load_model(a.checkpoint)
    load = lambda: codec.decode_indices(model, data)
    synth = lambda: codec.decompress(model, data)
  else:
    from hvq_jax.entropy import streams
    from hvq_jax.interop import export, torch_model
    net = torch_model.from_safetensors(a.export)
    net.coding = export.load_coding(a.export)   # read once; decompress uses it too
    def load():
      tables, fp, c = net.coding
      header, payload, hw = streams.read_header(data, fp, net.cfg, c["max_pixels"])
      gmap, idx = streams.decode(tables, net.cfg, int(c["z_range"]), header, payload, hw)
      return header, idx, gmap
    synth = lambda: torch_model.decompress(net, data)
  _, idx, gmap = load()
  base = reset_peak()
  t = time.perf_counter()
  img = synth()
  seconds = time.perf_counter() - t
  np.savez(a.result, img=img, gmap=gmap, seconds=seconds,
           peak=max(0, proc_status("VmHWM") - base), **{f"idx_{k}": v for k, v in idx.items()})


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--export", required=True, help="hvq export --format torch output")
  ap.add_argument("--files", nargs="+", required=True)
  ap.add_argument("--out", default="benchmarks/results/torch_decode_sizes.json")
  ap.add_argument("--backend", help=argparse.SUPPRESS)
  ap.add_argument("--file", help=argparse.SUPPRESS)
  ap.add_argument("--result", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.backend:
    return _child(a)
  tmp = tempfile.mkdtemp(prefix="hvq-torch-size-")
  rows = []
  for f in a.files:
    got = {}
    for backend in ("jax", "torch"):
      res = os.path.join(tmp, f"{backend}.npz")
      subprocess.run([sys.executable, os.path.abspath(__file__), "--checkpoint", a.checkpoint,
                      "--export", a.export, "--files", f, "--backend", backend, "--file", f,
                      "--result", res], check=True)
      got[backend] = dict(np.load(res))
    j, t = got["jax"], got["torch"]
    keys = sorted(k for k in j if k.startswith("idx_"))
    diff = np.abs(j["img"].astype(int) - t["img"].astype(int))
    h, w = j["img"].shape[:2]
    rows.append(dict(
        file=os.path.basename(f), size=f"{h}x{w}", megapixels=h * w / 1e6,
        map_equal=bool(np.array_equal(j["gmap"], t["gmap"])),
        indices_equal=all(np.array_equal(j[k], t[k]) for k in keys),
        pixels_max_abs_diff=int(diff.max()), pixels_differing=float((diff > 0).mean()),
        **{f"{b}_seconds": float(got[b]["seconds"]) for b in got},
        **{f"{b}_peak_mb_per_mp": float(got[b]["peak"]) / 2 ** 20 / (h * w / 1e6) for b in got}))
    print(json.dumps(rows[-1]), flush=True)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as fh:
    json.dump(dict(checkpoint=a.checkpoint, export=a.export, cores=len(os.sched_getaffinity(0)),
                   load_average=os.getloadavg(), rows=rows), fh, indent=1)
  print("wrote", a.out)


if __name__ == "__main__":
  main()
