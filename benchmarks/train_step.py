"""Training-step throughput: step time, images/s, compile time, peak memory, FLOPs/image.

  python benchmarks/train_step.py --config configs/default.py --batch 8 --size 256 \\
      [--mesh '(-1,1)'] [--steps 10] [--dtype bfloat16] [--remat] [--profile DIR]

Runs the real jitted, sharded `Trainer.train_step` on random uint8 batches. FLOPs come
from XLA's cost analysis of the compiled step (forward + backward + optimiser), so
MFU = flops_per_step / step_time / peak_flops_of_the_chips. Peak memory is XLA's
memory analysis of the compiled step, plus the allocator's peak on GPU/TPU. Saves JSON
under benchmarks/results/.

--profile DIR writes a `jax.profiler` trace of a few steps (TensorBoard / Perfetto) and
attributes the device time of every executed XLA op to a part of the step through the
op's source metadata (flax module path and our named scopes): convolutions, GroupNorm,
attention, the K-way rate softmax, the hyperprior networks, the optimiser, the rest.
The shares are printed and saved with the figures.
"""
import argparse
import ast
import glob
import gzip
import json
import os
import re
import time

import numpy as np
import jax

from hvq_jax.training.trainer import Trainer


def load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


# (category, pattern on an op's metadata op_name or its name), first match wins
CATEGORIES = (
    ("rate softmax (K-way index model)", r"rate_softmax"),
    ("hyperprior networks", r"/hyper_|bottleneck"),
    ("discriminator", r"disc|PatchGAN"),
    ("optimiser", r"optimizer|adam|clip_by_global_norm|apply_if_finite"),
    ("convolutions", r"conv_general_dilated|convolution"),
    ("attention", r"attn"),
    ("GroupNorm (incl. spatial norm)", r"norm"),
)


def _op_metadata(hlo_text: str) -> dict:
  """instruction name -> op_name metadata, from the compiled HLO text."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.M):
    out[m.group(1)] = m.group(2)
  return out


def profile_shares(trace_dir: str, hlo_text: str) -> dict:
  """Device time per category from the newest Perfetto trace under trace_dir."""
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = _op_metadata(hlo_text)
  per_cat, per_op = {}, {}
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    args = e.get("args", {}) or {}
    op = args.get("hlo_op") or args.get("long_name") or name
    op = op.split(" ")[0].lstrip("%")
    if op not in meta and name not in meta:
      continue                                 # host-side runtime events, not XLA ops
    where = meta.get(op) or meta.get(name, "")
    cat = next((c for c, pat in CATEGORIES if re.search(pat, where + " " + op, re.I)), "other")
    per_cat[cat] = per_cat.get(cat, 0.0) + e.get("dur", 0.0)
    per_op[op] = per_op.get(op, 0.0) + e.get("dur", 0.0)
  total = sum(per_cat.values()) or 1.0
  return dict(
      trace=files[-1], total_op_time_us=total,
      share={c: t / total for c, t in sorted(per_cat.items(), key=lambda x: -x[1])},
      top_ops=[dict(op=o, share=t / total, where=meta.get(o, ""))
               for o, t in sorted(per_op.items(), key=lambda x: -x[1])[:15]])


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
  ap.add_argument("--profile", default=None, help="write a jax.profiler trace here and print shares")
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
  trainer = Trainer(c)
  state = trainer.init_state(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = trainer.shard_batch(rng.integers(0, 256, (a.batch, a.size, a.size, 3), dtype=np.uint8))
  t = time.perf_counter()
  # the first phase's step: the tokenizer (or joint) step that most of a run is made of
  compiled = trainer.phase_steps[0].lower(state, batch).compile()
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
  shares = None
  if a.profile:
    jax.profiler.start_trace(a.profile, create_perfetto_trace=True)
    for _ in range(3):
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
    jax.profiler.stop_trace()
    shares = profile_shares(a.profile, compiled.as_text())
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
      peak_bytes_in_use=peak_alloc, loss=float(m["loss"]), profile=shares)
  out = a.out or f"benchmarks/results/train_step_{jax.default_backend()}_b{a.batch}_s{a.size}.json"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
