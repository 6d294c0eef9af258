"""Encode/decode time of a 768x512 image and entropy-coder throughput, saved as JSON.

  python benchmarks/codec.py --checkpoint runs/tiny_cpu [--repeats 3]

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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default="benchmarks/results/codec.json")
  a = ap.parse_args()
  model = codec.load_model(a.checkpoint)
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
