"""The training rate model (the float model's bits, every index priced by its pass's prior)
against the real files, on the held-out photos (their top-left 512x512, one program
size), for trained models.

  python results/spatial_context/rate_vs_file.py RUN [RUN ...] [--images /work/corpus/heldout]
"""
import argparse
import json

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax import codec
from hvq_jax.codec import coder
from hvq_jax.entropy import bitstream
from hvq_jax.evaluation import evaluate

RATIOS = ((0.1, 0.4, 0.5), (0.5, 0.3, 0.2))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("runs", nargs="+")
  ap.add_argument("--images", default="/work/corpus/heldout")
  ap.add_argument("--lmbda", type=float, default=0.2)
  a = ap.parse_args()
  ims = {k: v[:512, :512] for k, v in evaluate.load_images(a.images).items()}
  out = {}
  for run in a.runs:
    m = codec.load_model(run)
    rate = jax.jit(lambda p, x, l, r: m.model.apply({"params": p}, x, l, r)["bits"])
    est_all, file_all, worst = 0.0, 0.0, 0.0
    for img in ims.values():
      for r in RATIOS:
        data = codec.compress(m, img, lmbda=a.lmbda, ratios=r)
        xp = coder.pad_image(coder.prepare_image(m, img), m.cfg.strides[0])
        x = jnp.asarray(xp[None], jnp.float32) / 127.5 - 1
        bits = jax.device_get(rate(m.params, x, jnp.full((1,), a.lmbda),
                                   jnp.asarray(r, jnp.float32)))
        est = float(sum(float(v[0]) for v in bits.values()))
        got = 8.0 * (len(data) - bitstream.CONTAINER_BYTES)
        est_all, file_all = est_all + est, file_all + got
        worst = max(worst, abs(est / got - 1))
    out[run] = dict(files=len(ims) * len(RATIOS), estimate_vs_file=est_all / file_all - 1,
                    worst_file=worst)
    print(run, json.dumps(out[run]), flush=True)


if __name__ == "__main__":
  main()
