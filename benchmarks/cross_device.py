"""Files made on one device, decoded on another: the portable-bitstream check.

  # on the GPU (or TPU) machine
  python benchmarks/cross_device.py encode --checkpoint runs/x --dir xdev/
  # on a CPU machine with the same checkpoint (and the reverse direction likewise)
  python benchmarks/cross_device.py decode --checkpoint runs/x --dir xdev/

`encode` compresses the bundled held-out photos (and a 768x512 crop) at the trained
lambdas and stores, per file, the .hvq bytes, the encoding device's own decoded indices
and its reconstruction (PNG). `decode` decodes every file and counts: exact (same
symbols; the digest guarantees it), BitstreamError (refused), wrong image (decoded to
other indices: must never happen); it reports the largest pixel difference from the
encoding device's reconstruction (float synthesis network, so rounding may differ).
Figures are printed and saved as JSON in the directory.
"""
import argparse
import json
import os
import time

import numpy as np
import jax
from PIL import Image

from hvq_jax import codec, images


def _photos():
  out = dict(images.bundled_photos("heldout"))
  out["retina_crop"] = images.bundled_photo("retina")[300:812, 300:1068]
  return out


def encode(model, folder):
  os.makedirs(folder, exist_ok=True)
  made = []
  for name, img in _photos().items():
    for lm in model.config.rd.lambdas:
      stem = f"{name}@{float(lm):g}"
      data = codec.compress(model, img, lmbda=float(lm))
      _, idx, gmap = codec.decode_indices(model, data)
      rec = codec.decompress(model, data)
      with open(os.path.join(folder, stem + ".hvq"), "wb") as f:
        f.write(data)
      np.savez(os.path.join(folder, stem + ".indices.npz"), gmap=gmap, **idx)
      Image.fromarray(rec).save(os.path.join(folder, stem + ".png"))
      made.append(stem)
  return dict(files=made)


def decode(model, folder):
  counts = dict(exact=0, bitstream_error=0, wrong_image=0)
  worst, errors = 0, {}
  stems = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".hvq"))
  for stem in stems:
    with open(os.path.join(folder, stem + ".hvq"), "rb") as f:
      data = f.read()
    try:
      _, idx, gmap = codec.decode_indices(model, data)
      rec = codec.decompress(model, data)
    except codec.BitstreamError as e:
      counts["bitstream_error"] += 1
      errors[stem] = str(e)
      continue
    ref = np.load(os.path.join(folder, stem + ".indices.npz"))
    same = np.array_equal(ref["gmap"], gmap) and all(np.array_equal(ref[k], v) for k, v in idx.items())
    counts["exact" if same else "wrong_image"] += 1
    enc_rec = np.asarray(Image.open(os.path.join(folder, stem + ".png")))
    worst = max(worst, int(np.abs(enc_rec.astype(int) - rec.astype(int)).max()))
  return dict(files=len(stems), counts=counts, max_pixel_diff_vs_encoder=worst, errors=errors)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("mode", choices=("encode", "decode"))
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--dir", required=True)
  a = ap.parse_args()
  t = time.time()
  model = codec.load_model(a.checkpoint)
  result = (encode if a.mode == "encode" else decode)(model, a.dir)
  result.update(mode=a.mode, device=str(jax.devices()[0]), backend=jax.default_backend(),
                device_kind=getattr(jax.devices()[0], "device_kind", ""),
                fingerprint=model.fingerprint.hex(), seconds=time.time() - t)
  with open(os.path.join(a.dir, f"{a.mode}_{jax.default_backend()}.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "files" or a.mode == "decode"}, indent=1))
  return 1 if result.get("counts", {}).get("wrong_image") else 0


if __name__ == "__main__":
  raise SystemExit(main())
