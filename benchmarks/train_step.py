"""Training-step throughput: step time, images/s, compile time, peak memory, FLOPs/image.

  python benchmarks/train_step.py --config configs/default.py --batch 8 --size 256 \\
      [--mesh '(-1,1)'] [--steps 10] [--dtype bfloat16] [--remat]

Runs the real jitted, sharded `Trainer.train_step` on random uint8 batches. FLOPs come
from XLA's cost analysis of the compiled step (forward + backward + optimiser), so
MFU = flops_per_step / step_time / peak_flops_of_the_chips. Peak memory is XLA's
memory analysis of the compiled step, plus the allocator's peak on GPU/TPU. Saves JSON
under benchmarks/results/.
"""
import argparse
import ast
import json
import os
import time

import numpy as np
import jax

from hvq_jax.training import train


def load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/default.py")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--mesh", default=None, help="e.g. '(-1,1)' or '(4,2)'")
  ap.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--gan", action="store_true", help="include the discriminator/GAN terms")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  c = load_config(a.config)
  c.train.batch_size, c.image_size = a.batch, a.size
  c.loss.w_lpips = 0.0   # LPIPS weights are not bundled; the network cost is reported without it
  if not a.gan:
    c.loss.w_gan = 0.0
  if a.mesh:
    c.mesh.shape = tuple(ast.literal_eval(a.mesh))
  if a.dtype:
    c.model.dtype = a.dtype
  c.model.remat = bool(a.remat)
  trainer = train.Trainer(c)
  state = trainer.init_state(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = trainer.shard_batch(rng.integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8))
  t = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  mem = compiled.memory_analysis()
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(a.steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step = float(np.median(times))
  dev = jax.devices()[0]
  peak_alloc = None
  try:
    peak_alloc = dev.memory_stats().get("peak_bytes_in_use")
  except Exception:   # CPU has no allocator stats
    pass
  result = dict(
      config=a.config, batch=a.batch, size=a.size, mesh=dict(trainer.mesh.shape),
      dtype=c.model.dtype, remat=c.model.remat, gan=a.gan, backend=jax.default_backend(),
      device=getattr(dev, "device_kind", str(dev)), devices=jax.device_count(),
      compile_s=compile_s, step_s_median=step, step_s_all=times,
      images_per_s=a.batch / step, flops_per_step=flops, flops_per_image=flops / a.batch,
      achieved_tflops=flops / step / 1e12,
      memory_analysis_bytes=dict(
          arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
          temporaries=mem.temp_size_in_bytes, generated_code=mem.generated_code_size_in_bytes)
      if mem is not None else None,
      peak_bytes_in_use=peak_alloc, loss=float(m["loss"]))
  out = a.out or f"benchmarks/results/train_step_{jax.default_backend()}_b{a.batch}_s{a.size}.json"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
