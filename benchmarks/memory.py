"""Peak memory of the generator's forward and forward+backward, from XLA's own analysis.

  python benchmarks/memory.py --config configs/default.py --batch 8 --size 256

Compiles (does not run) the step on the local backend and reads
`compiled.memory_analysis()`: argument, output and temporary bytes. Also compares the
rate model's chunked pricing (`model.rate_chunk`) with pricing every position at once.
Prints a table and saves JSON under benchmarks/results/.
"""
import argparse
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp

from hvq_jax.nn import model as model_lib


def load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def analyse(model, params_shape, batch, size, grad):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  lm = jax.ShapeDtypeStruct((batch,), jnp.float32)
  ratios = jax.ShapeDtypeStruct((3,), jnp.float32)
  rng = jax.random.PRNGKey(0)

  def loss(p, x, lm, r):
    out = model.apply({"params": p}, x, lm, r, training=True, rngs={"noise": rng})
    return jnp.mean(lm * out["bpp"]) + jnp.mean(jnp.abs(out["recon"] - x)) + out["commitment_loss"]

  fn = jax.grad(loss) if grad else loss
  t = time.time()
  compiled = jax.jit(fn).lower(params_shape, x, lm, ratios).compile()
  m = compiled.memory_analysis()
  return dict(compile_s=round(time.time() - t, 1),
              argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
              temp_bytes=m.temp_size_in_bytes,
              peak_bytes=m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/default.py")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--out", default="benchmarks/results")
  ap.add_argument("--remat", action="store_true", help="rematerialise encoder/decoder ResBlocks")
  ap.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
  a = ap.parse_args()
  cfg = load_config(a.config)
  cfg.model.remat = bool(a.remat)
  if a.dtype:
    cfg.model.dtype = a.dtype
  rows = {}
  for chunk in (cfg.model.rate_chunk, 0):
    cfg.model.rate_chunk = chunk
    model = model_lib.build(cfg.model)
    shapes = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.PRNGKey(0), 64))
    for grad in (False, True):
      key = f"{'fwd+bwd' if grad else 'fwd'} rate_chunk={chunk or 'off'}"
      rows[key] = analyse(model, shapes, a.batch, a.size, grad)
      print(f"{key:28s} peak {rows[key]['peak_bytes'] / 2**30:7.2f} GiB "
            f"(temp {rows[key]['temp_bytes'] / 2**30:.2f} GiB, compile {rows[key]['compile_s']} s)")
  k, d = cfg.model.codebook_size, cfg.model.strides[-1]
  fine_positions = a.batch * (a.size // d) ** 2
  result = dict(config=a.config, batch=a.batch, size=a.size, remat=cfg.model.remat,
                dtype=cfg.model.dtype, backend=jax.default_backend(),
                device=str(jax.devices()[0]), fine_logit_block_bytes=fine_positions * k * 4,
                results=rows)
  os.makedirs(a.out, exist_ok=True)
  name = os.path.splitext(os.path.basename(a.config))[0]
  tag = ("_remat" if a.remat else "") + (f"_{a.dtype}" if a.dtype else "")
  path = os.path.join(a.out, f"memory_{name}_b{a.batch}_{a.size}{tag}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print("saved", path)


if __name__ == "__main__":
  main()
