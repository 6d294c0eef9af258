"""Mixed precision check: the same training run in float32 and with bfloat16 compute.

  python benchmarks/precision.py [--config configs/tiny_cpu.py] [--steps 300] [--seed 0]

Trains `--config` from the same init (params are float32 in both: `model.dtype` is the
compute dtype) on the same batches (the grain training pipeline, made once and fed to
both runs) with `model.dtype` float32 and then bfloat16, and compares the loss curves.
Writes benchmarks/results/precision_<backend>_<config>_s<steps>.json (every step's
metrics of both runs, smoothed losses, their relative difference, timings) and a .png
plot beside it, and prints the largest relative difference of the smoothed losses.

It also lists, from the traced bf16 training step (forward and backward), every
reduction (sums, maxima, argmin) and exp/log/rsqrt/division that runs in bfloat16, by
category (`low_precision_ops`): GroupNorm statistics, the K-way index softmax, the
entropy bottleneck and the losses must all be float32 ("other" empty); convolutions,
matmuls, activations and flax's bias adds run in bf16 by design.
"""
import argparse
import importlib.util
import json
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from hvq_jax.training import data as data_lib
from hvq_jax.training.trainer import Trainer

# Primitives that must not run in bf16 under mixed precision (reductions and the
# transcendental functions of norms, softmaxes and likelihoods).
SENSITIVE = ("reduce_sum", "reduce_max", "reduce_min", "argmin", "argmax", "cumsum",
             "cumlogsumexp", "exp", "log", "log1p", "expm1", "rsqrt", "sqrt", "logistic",
             "erf", "erfc", "pow", "div", "integer_pow")
LOW = (jnp.bfloat16, jnp.float16)


def load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def _where(eqn) -> str:
  src = getattr(eqn, "source_info", None)
  stack = getattr(src, "name_stack", None)
  return str(stack) if stack is not None else ""


ACTIVATIONS = ("logistic", "integer_pow", "tanh", "erf")   # swish, gelu: bf16 by design


def low_precision_ops(jaxpr, found=None):
  """SENSITIVE primitives with a bf16/f16 operand, {category: {primitive: {name stack:
  count}}}, and the count of convolutions / dot products per operand dtype.

  Categories: 'activation' (swish's sigmoid, gelu's cube: elementwise on bf16
  activations, as meant), 'bias_gradient' (the reduce_sum over batch and space of a
  bf16 cotangent in the backward pass of a Conv/Dense bias: flax adds the bias in the
  compute dtype), 'other' (norm statistics, softmaxes, likelihoods, losses: must be empty).
  """
  found = found if found is not None else dict(sensitive={}, conv={}, dot={})
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    dts = {str(v.aval.dtype) for v in eqn.invars if hasattr(v, "aval") and hasattr(v.aval, "dtype")}
    if name == "conv_general_dilated":
      k = "/".join(sorted(dts))
      found["conv"][k] = found["conv"].get(k, 0) + 1
    elif name == "dot_general":
      k = "/".join(sorted(dts))
      found["dot"][k] = found["dot"].get(k, 0) + 1
    elif name in SENSITIVE and any(d in ("bfloat16", "float16") for d in dts):
      where = _where(eqn) or "?"
      if name in ACTIVATIONS:
        cat = "activation"
      elif name == "reduce_sum" and where.startswith("transpose("):
        cat = "bias_gradient"
      else:
        cat = "other"
      w = found["sensitive"].setdefault(cat, {}).setdefault(name, {})
      w[where] = w.get(where, 0) + 1
    for sub in _sub_jaxprs(eqn):
      low_precision_ops(sub, found)
  return found


def smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (the first points average what there is)."""
  c = np.cumsum(np.insert(np.asarray(x, np.float64), 0, 0.0))
  n = np.arange(1, len(x) + 1)
  lo = np.maximum(n - window, 0)
  return (c[n] - c[lo]) / (n - lo)


def run(config, batches, seed):
  trainer = Trainer(config)
  state = trainer.init_state(jax.random.PRNGKey(seed))
  init_params = jax.device_get(state["params"])
  b0 = trainer.shard_batch(batches[0])
  t = time.perf_counter()
  step = trainer.train_step.lower(state, b0).compile()
  compile_s = time.perf_counter() - t
  metrics = []
  t = time.perf_counter()
  for i, b in enumerate(batches):
    state, m = step(state, trainer.shard_batch(b))
    metrics.append(m)                 # fetched once at the end: no sync per step
    if i == 0:
      jax.block_until_ready(m)
      t_first = time.perf_counter() - t
  metrics = jax.device_get(metrics)
  wall = time.perf_counter() - t
  keys = sorted(metrics[0])
  per_step = {k: [float(m[k]) for m in metrics] for k in keys}
  return trainer, state, init_params, per_step, dict(
      compile_s=compile_s, steps_s=wall,
      steps_per_s=(len(batches) - 1) / max(wall - t_first, 1e-9))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/tiny_cpu.py")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--smooth", type=int, default=25, help="moving-average window (steps)")
  ap.add_argument("--out", default=None, help="JSON path (the PNG goes beside it)")
  a = ap.parse_args()

  base = load_config(a.config)
  base.train.recipe = "joint"   # one step program: the comparison is of dtypes, not phases
  base.seed = a.seed
  base.train.num_steps = a.steps        # the same lr schedule as a run of that length
  it = iter(data_lib.train_dataset(base))
  batches = [next(it) for _ in range(a.steps)]

  runs = {}
  for dtype in ("float32", "bfloat16"):
    c = load_config(a.config)
    c.seed, c.train.num_steps, c.model.dtype = a.seed, a.steps, dtype
    print(f"{dtype}: training {a.steps} steps ...", flush=True)
    trainer, state, init_params, per_step, timing = run(c, batches, a.seed)
    runs[dtype] = dict(metrics=per_step, timing=timing, init=init_params,
                       trainer=trainer, state=state)
    print(f"  compile {timing['compile_s']:.1f} s, {timing['steps_per_s']:.3f} steps/s, "
          f"final loss {per_step['loss'][-1]:.4f}", flush=True)

  same_init = all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(runs["float32"]["init"]), jax.tree.leaves(runs["bfloat16"]["init"])))
  dtypes = {str(x.dtype) for x in jax.tree.leaves(runs["bfloat16"]["state"]["params"])}

  # which sensitive ops run in bf16 in the bf16 step (traced, not compiled)
  tr = runs["bfloat16"]["trainer"]
  abstract_batch = jax.ShapeDtypeStruct(batches[0].shape, batches[0].dtype)
  jaxpr = jax.make_jaxpr(tr._train_step)(tr.abstract_state, abstract_batch)
  ops = low_precision_ops(jaxpr.jaxpr)

  f32 = np.asarray(runs["float32"]["metrics"]["loss"])
  b16 = np.asarray(runs["bfloat16"]["metrics"]["loss"])
  s32, s16 = smooth(f32, a.smooth), smooth(b16, a.smooth)
  rel = np.abs(s16 - s32) / np.abs(s32)
  after = slice(a.smooth, None)         # past the first window (few points averaged)
  summary = dict(
      max_rel_diff_smoothed_loss=float(np.max(rel[after])) if a.steps > a.smooth else float(np.max(rel)),
      argmax_step=int(np.argmax(rel[after]) + a.smooth + 1) if a.steps > a.smooth else int(np.argmax(rel) + 1),
      mean_rel_diff_smoothed_loss=float(np.mean(rel[after])) if a.steps > a.smooth else float(np.mean(rel)),
      final_smoothed_loss=dict(float32=float(s32[-1]), bfloat16=float(s16[-1])),
      final_rel_diff=float(rel[-1]))
  for k in ("bpp", "psnr", "rate", "rec"):
    if k in runs["float32"]["metrics"]:
      x = smooth(runs["float32"]["metrics"][k], a.smooth)[-1]
      y = smooth(runs["bfloat16"]["metrics"][k], a.smooth)[-1]
      summary[f"final_smoothed_{k}"] = dict(float32=float(x), bfloat16=float(y))

  name = os.path.splitext(os.path.basename(a.config))[0]
  out = a.out or f"benchmarks/results/precision_{jax.default_backend()}_{name}_s{a.steps}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  dev = jax.devices()[0]
  result = dict(
      config=a.config, steps=a.steps, seed=a.seed, smooth_window=a.smooth,
      batch=base.train.batch_size, image_size=base.image_size,
      backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
      jax=jax.__version__, same_init_params=same_init, bf16_run_param_dtypes=sorted(dtypes),
      summary=summary,
      bf16_step_ops=dict(sensitive_ops_in_low_precision=ops["sensitive"],
                         conv_operand_dtypes=ops["conv"], dot_operand_dtypes=ops["dot"]),
      timing={k: runs[k]["timing"] for k in runs},
      metrics={k: runs[k]["metrics"] for k in runs},
      smoothed_loss=dict(float32=s32.tolist(), bfloat16=s16.tolist()))
  with open(out, "w") as f:
    json.dump(result, f, indent=1)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = np.arange(1, a.steps + 1)
  fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                         gridspec_kw=dict(height_ratios=[3, 2, 1.5]))
  for k, col in (("float32", "C0"), ("bfloat16", "C3")):
    ax[0].plot(steps, runs[k]["metrics"]["loss"], color=col, alpha=0.25, lw=0.8)
    ax[0].plot(steps, smooth(runs[k]["metrics"]["loss"], a.smooth), color=col, lw=2,
               label=f"{k} (moving average of {a.smooth})")
    ax[1].plot(steps, smooth(runs[k]["metrics"]["psnr"], a.smooth), color=col, lw=2,
               label=f"{k} PSNR")
  ax[0].set_ylabel("training loss")
  ax[0].set_yscale("log")
  ax[0].legend()
  ax[0].set_title(f"{name}: float32 vs bfloat16 compute, same init and batches "
                  f"({jax.default_backend()})")
  ax[1].set_ylabel("PSNR (dB, smoothed)")
  ax[1].legend()
  ax[2].plot(steps, 100 * rel, color="k")
  ax[2].set_ylabel("|bf16 - f32| / f32\nsmoothed loss (%)")
  ax[2].set_xlabel("step")
  fig.tight_layout()
  png = os.path.splitext(out)[0] + ".png"
  fig.savefig(png, dpi=110)

  counts = {cat: {p: sum(w.values()) for p, w in prims.items()}
            for cat, prims in ops["sensitive"].items()}
  print(json.dumps(dict(summary=summary, same_init_params=same_init,
                        bf16_run_param_dtypes=sorted(dtypes),
                        sensitive_ops_in_bf16=counts, conv_operand_dtypes=ops["conv"],
                        dot_operand_dtypes=ops["dot"], timing=result["timing"]), indent=1))
  other = ops["sensitive"].get("other", {})
  print("reductions / exp / log / rsqrt / divisions in bf16 outside activations and bias "
        "gradients (norm statistics, rate, bottleneck, losses): "
        + ("none" if not other else json.dumps(other, indent=1)))
  print(f"max relative difference of the smoothed losses (steps > {a.smooth}): "
        f"{summary['max_rel_diff_smoothed_loss']:.4f} at step {summary['argmax_step']}")
  print(f"wrote {out} and {png}")


if __name__ == "__main__":
  main()
