"""Encode/decode time of several models on the same 768x512 image, interleaved, saved as JSON.

  nice -n 19 python benchmarks/codec_compare.py RUN_A RUN_B [...] [--repeats 9] \
      [--out benchmarks/results/codec_compare.json]

The image and the stages are those of benchmarks/codec.py (model, pmf, range_coding);
decode also times the entropy decoding alone (`indices`: map, z and every pass's indices)
and in it the integer prior (`prior`: hyper-synthesis and context convs).
Each repeat codes the image with every model in turn, so load from other jobs on the
machine falls on all of them alike; medians and minima per stage, and each model's
median against the first model's (the ratio of the medians of total time). Also each
model's float rate estimate (the training rate model, at the file's lambda and ratios)
against the file's payload bits.
"""
import argparse
import json
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax import codec, images
from hvq_jax.entropy import bitstream
from hvq_jax.codec import coder, profile

STAGES = ("total", "model", "pmf", "range_coding", "colour", "indices", "prior")


def rate_estimate_bits(m, img) -> float:
  """The float model's bits for img at the model's default lambda and ratios (what
  codec.compress codes by default)."""
  x = jnp.asarray(img, jnp.float32)[None] / 127.5 - 1
  out = m.model.apply({"params": m.params}, x, jnp.full((1,), m.default_lmbda),
                      jnp.asarray(m.default_ratios, jnp.float32))
  return float(sum(float(v[0]) for v in jax.device_get(out["bits"]).values()))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("checkpoints", nargs="+")
  ap.add_argument("--repeats", type=int, default=9)
  ap.add_argument("--out", default="benchmarks/results/codec_compare.json")
  a = ap.parse_args()
  img = images.bundled_photo("retina")[300:812, 300:1068]
  models = {c: codec.load_model(c) for c in a.checkpoints}
  data = {c: codec.compress(m, img) for c, m in models.items()}   # compiles
  for c, m in models.items():
    codec.decompress(m, data[c])
  rows = {c: dict(encode=[], decode=[]) for c in models}
  for _ in range(a.repeats):
    for c, m in models.items():
      t = time.perf_counter()
      data[c], st = profile.compress(m, img)
      rows[c]["encode"].append(dict(st["seconds"], total=time.perf_counter() - t))
      t = time.perf_counter()
      _, seconds = profile.decompress(m, data[c])
      total = time.perf_counter() - t
      timer = profile.StageTimer()   # the indices alone: the integer prior is its "model"
      t = time.perf_counter()
      coder.decode_indices(m, data[c], timer)
      rows[c]["decode"].append(dict(seconds, total=total, indices=time.perf_counter() - t,
                                    prior=timer.seconds.get("model", 0.0)))
  stat = lambda rs, k, f: float(f([r.get(k, 0.0) for r in rs]))
  out = dict(image="retina crop 768x512", backend=jax.default_backend(), repeats=a.repeats,
             loadavg=os.getloadavg(), models={})
  first = a.checkpoints[0]
  for c in a.checkpoints:
    payload = 8 * (len(data[c]) - bitstream.CONTAINER_BYTES)
    est = rate_estimate_bits(models[c], img)
    r = dict(bytes=len(data[c]), bpp=8 * len(data[c]) / (512 * 768), payload_bits=payload,
             rate_model_bits=est, rate_model_vs_file=est / payload - 1)
    for d in ("encode", "decode"):
      r[f"{d}_median_s"] = {k: stat(rows[c][d], k, np.median) for k in STAGES}
      r[f"{d}_min_s"] = {k: stat(rows[c][d], k, np.min) for k in STAGES}
      r[f"{d}_vs_first"] = (r[f"{d}_median_s"]["total"]
                            / stat(rows[first][d], "total", np.median))
    out["models"][c] = r
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
