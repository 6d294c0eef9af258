"""Byte identity of the codec across a change: code a fixed set of images and compare.

  python benchmarks/byte_identity.py write DIR    # before the change: files + SHA-256
  python benchmarks/byte_identity.py check DIR    # after: same files, and DIR's files decode

Every model kind the tests build (micro config: hyperprior on and off, residual VQ, the
coarser context, per-granularity and unnormalised codebooks; the tiny demo config), random
init with fixed seeds, bundled photos at several sizes, several lambdas and ratios. A
refactoring that changes no behaviour gives the same bytes and the same decoded pixels.
"""
import argparse
import hashlib
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from hvq_jax import codec
from hvq_jax import images as images_lib
from hvq_jax.configs import micro, tiny_cpu
from hvq_jax.nn import model as model_lib


def _micro():
  cfg = micro.shrink(tiny_cpu.get_config())
  m = cfg.model
  m.hyperprior.context = "none"
  m.dec_mid_attn, m.dec_attn_strides = True, (16,)   # as the tests' micro model
  return cfg


def _variant(edit):
  def make():
    c = _micro()
    edit(c)
    return c
  return make


MODELS = {
    "micro": _variant(lambda c: None),
    "hyperprior_off": _variant(lambda c: c.model.hyperprior.update(enabled=False)),
    "residual_vq": _variant(lambda c: c.model.update(rvq_stages=2)),
    "context_coarser": _variant(lambda c: c.model.hyperprior.update(context="coarser")),
    "per_granularity_codebook": _variant(lambda c: c.model.update(shared_codebook=False)),
    "unnormalised": _variant(lambda c: c.model.update(l2_normalized=False)),
    "no_mask_z": _variant(lambda c: c.model.hyperprior.update(mask_z=False)),
    "tiny_cpu": tiny_cpu.get_config,
}
SETTINGS = [(0.2, (0.1, 0.4, 0.5)), (0.05, (1.0, 0.0, 0.0)), (0.8, (0.0, 0.0, 1.0)),
            (0.3, (0.3, 0.3, 0.4))]


def _images():
  photos = images_lib.bundled_photos("heldout")
  names = sorted(photos)
  a, b = photos[names[0]], photos[names[1]]
  return {"full_" + names[0]: a, "crop_odd": b[13:13 + 75, 7:7 + 131],
          "tiny": a[:21, :37], "wide": b[:96, :]}


def _params(name, cfg):
  model = model_lib.build(cfg.model)
  params = model_lib.init_params(model, jax.random.PRNGKey(sorted(MODELS).index(name)))
  # trained-like prior weights: the init's small ones would leave most paths near zero
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v * 3.0 if "context" in jax.tree_util.keystr(p) else v, params)


def sha(b: bytes) -> str:
  return hashlib.sha256(b).hexdigest()


def run(out_dir: str, write: bool) -> int:
  os.makedirs(out_dir, exist_ok=True)
  ref_path = os.path.join(out_dir, "sha256.json")
  ref = {} if write else json.load(open(ref_path))
  got, bad = {}, []
  imgs = _images()
  for name, make in MODELS.items():
    cfg = make()
    cm = codec.CodecModel(cfg, _params(name, cfg))
    for iname, img in imgs.items():
      for lm, ratios in SETTINGS:
        key = f"{name}/{iname}/{lm}/{'-'.join(f'{r:g}' for r in ratios)}"
        data = codec.compress(cm, img, lmbda=lm, ratios=ratios)
        pix = codec.decompress(cm, data)
        got[key] = dict(file=sha(data), pixels=sha(np.ascontiguousarray(pix).tobytes()),
                        bytes=len(data))
        fpath = os.path.join(out_dir, key.replace("/", "__") + ".hvq")
        if write:
          open(fpath, "wb").write(data)
        else:
          old = open(fpath, "rb").read()   # a file made before the change decodes the same
          old_pix = sha(np.ascontiguousarray(codec.decompress(cm, old)).tobytes())
          if got[key] != ref.get(key) or old_pix != ref[key]["pixels"]:
            bad.append(key)
      print(f"{name}/{iname}: {len(SETTINGS)} files", flush=True)
  if write:
    json.dump(got, open(ref_path, "w"), indent=1, sort_keys=True)
    print(f"wrote {len(got)} files and their SHA-256 to {out_dir}")
    return 0
  missing = sorted(set(ref) - set(got))
  print(f"{len(got) - len(bad)} of {len(ref)} files identical, byte for byte and pixel for "
        f"pixel; {len(bad)} differ{': ' + ', '.join(bad) if bad else ''}"
        f"{'; missing: ' + ', '.join(missing) if missing else ''}")
  return 1 if bad or missing else 0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("mode", choices=["write", "check"])
  p.add_argument("dir")
  a = p.parse_args(argv)
  return run(a.dir, a.mode == "write")


if __name__ == "__main__":
  sys.exit(main())
