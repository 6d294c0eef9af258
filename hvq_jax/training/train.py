"""`hvq train`: create the state (restore or init), train, report on held-out photos.

    hvq train --config configs/tiny_cpu.py --workdir runs/tiny_cpu

`train_and_evaluate` reads top to bottom: the state it resumes from (`resume.py`), the
loop that dispatches steps (`trainer.py`), logs (`metric_writer.py`) and checkpoints, and
the held-out report (`heldout.py`).
"""
import collections
import functools
import json
import math
import signal
import threading
import time
from typing import Any, Dict, Optional

import numpy as np
import jax
import jax.numpy as jnp
from etils import epath

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax.nn import model as model_lib
from hvq_jax.training import data as data_lib
from hvq_jax.training import heldout
from hvq_jax.training import phases
from hvq_jax.training import sharding
from hvq_jax.training import workdir_lock
from hvq_jax.training.metric_writer import MetricWriter
from hvq_jax.training.resume import flatten, matches, restore_or_init
from hvq_jax.training.trainer import Trainer

PREEMPTED_EXIT_CODE = 75   # sysexits EX_TEMPFAIL: saved on SIGTERM, rerun to resume


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps; nothing non-finite was saved."""


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       allow_config_change: bool = False,
                       trainer: Optional[Trainer] = None) -> Dict[str, Any]:
  """Train (resuming from the newest checkpoint in workdir), then evaluate held-out photos.

  `workdir` may be a local folder or a URL such as gs://bucket/run (every host of a pod
  must see the same checkpoints). Returns dict(state, eval, preempted).
  Raises TrainingDiverged after train.max_bad_steps consecutive non-finite steps.
  `trainer`: a Trainer built for this same config, to reuse its compiled step.
  """
  heldout.check_eval_source(config)
  if trainer is None:
    trainer = Trainer(config)
  elif _trainer_fields(trainer.config) != _trainer_fields(config):
    raise ValueError("train_and_evaluate: the trainer was built for another config")
  if config.train.max_bad_steps < 1:
    raise model_lib.ConfigError(
        f"config.train.max_bad_steps must be >= 1, got {config.train.max_bad_steps}")
  workdir = ckpt_lib.normalize(workdir)
  # One writer per workdir, from before anything is written (Orbax's removal of an
  # interrupted run's unfinished saves included) to the held-out report: a second run
  # refuses, naming this one.
  lock = workdir_lock.hold(workdir)
  try:
    return _train_and_evaluate(config, workdir, progress, allow_config_change, trainer, lock)
  finally:
    lock.release()


def _train_and_evaluate(config, workdir: str, progress: bool, allow_config_change: bool,
                        trainer: Trainer, lock) -> Dict[str, Any]:
  is_main = jax.process_index() == 0
  tc = config.train
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.join(workdir, "checkpoints"), keep=tc.keep,
                               keep_best=tc.keep_best, best_metric="loss",
                               async_save=tc.async_checkpoint)
  writer = None
  preemption = None
  try:
    data_iter = iter(data_lib.train_dataset(config, jax.process_index(), jax.process_count()))
    state, start = restore_or_init(ckpt, trainer, config, data_iter, allow_config_change,
                                   workdir)
    writer = MetricWriter(workdir, is_main, resume_step=start)
    if is_main and len(trainer.phases) > 1:
      print(f"recipe {config.train.recipe}: {phases.describe(trainer.phases)}")
    preemption = _Preemption()
    state, preempted = _train_loop(trainer, config, state, start, data_iter, ckpt, writer,
                                   preemption, progress and is_main, lock)
    ckpt.wait()
  except BaseException:
    if writer is not None:
      writer.close()
    raise
  finally:
    if preemption is not None:
      preemption.close()
    ckpt.close()      # waits for a save in flight: a failure above keeps the saves before it

  results = {}
  if config.eval.enabled and not preempted:
    results = _report(trainer, config, state, workdir, writer, is_main)
  writer.close()
  return dict(state=state, eval=results, preempted=preempted)


def _train_loop(trainer, config, state, start: int, data_iter, ckpt, writer, preemption,
                progress: bool, lock=None):
  """Steps `start`..num_steps: log every log_every, save every ckpt_every and at the end,
  stop with a save on preemption. Returns (state, preempted)."""
  from tqdm import tqdm
  tc = config.train
  is_main = jax.process_index() == 0
  bar = tqdm(total=tc.num_steps, initial=start, disable=not progress, unit="step",
             dynamic_ncols=True)
  t0, seen = time.time(), 0
  losses_since_save = []   # finite logged losses: the "best" metric of the next save
  last_saved = start

  def save(step, force=False):
    nonlocal losses_since_save, last_saved
    if not bool(jax.device_get(_all_finite(state))):
      raise TrainingDiverged(f"step {step}: the training state holds NaN or Inf; not saved "
                             f"(the newest checkpoint, step {last_saved}, is finite)")
    metrics = {"loss": float(np.mean(losses_since_save))} if losses_since_save else None
    if lock is not None:
      lock.check()    # another run took the workdir over (this one was stopped too long)
    ckpt.save(step, state, feed.checkpoint_item(), config, metrics=metrics, force=force)
    losses_since_save, last_saved = [], step
    writer.flush()

  # Batches go onto the mesh one step ahead (DevicePrefetch), and the loop waits on the
  # device only at log and checkpoint steps: in between it dispatches steps (JAX runs
  # them asynchronously) and never reads a step's outputs. `inflight` bounds how far the
  # host runs ahead (each queued step holds its input batch in device memory): before
  # dispatching more, it waits (block_until_ready, no transfer) for the step `depth`
  # steps back, which leaves the device `depth` steps of work.
  depth = max(1, int(config.data.device_prefetch))
  feed = data_lib.DevicePrefetch(data_iter, trainer.shard_batch, depth)
  inflight = collections.deque()
  preempted = False
  for step in range(start, tc.num_steps):
    done = step + 1
    will_save = done % tc.ckpt_every == 0 or done == tc.num_steps
    will_log = done % tc.log_every == 0 or will_save
    batch = next(feed)
    state, m = trainer.step_for(step)(state, batch)
    seen += batch.shape[0]
    inflight.append(m["loss"])
    if len(inflight) > depth:
      inflight.popleft().block_until_ready()
    if will_log:
      inflight.clear()
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      m["images_per_s"] = seen / max(time.time() - t0, 1e-9)
      t0, seen = time.time(), 0
      if m["skipped"] and is_main:
        print(f"step {done}: non-finite loss or gradient, update skipped "
              f"({int(m['bad_streak'])} in a row)")
      if math.isfinite(m["loss"]):
        losses_since_save.append(m["loss"])
      writer.scalars(done, m)
      if m["bad_streak"] >= tc.max_bad_steps:
        raise TrainingDiverged(
            f"training diverged: {int(m['bad_streak'])} consecutive steps with a non-finite "
            f"loss or gradient, up to step {done} (train.max_bad_steps={tc.max_bad_steps}). "
            f"Every one was skipped and nothing after step {last_saved} was saved: the "
            f"newest checkpoint holds finite params. Lower train.lr or check the data, "
            f"then rerun.")
      bar.set_postfix(phase=trainer.phases[int(m["phase"])].name, loss=f"{m['loss']:.3f}",
                      bpp=f"{m['bpp']:.3f}", psnr=f"{m['psnr']:.1f}",
                      img_s=f"{m['images_per_s']:.1f}")
    bar.update(1)
    if preemption.reached(done):
      save(done, force=True)
      preempted = True
      if is_main:
        print(f"preempted: saved step {done}; relaunch the same command to resume "
              f"(exit code {PREEMPTED_EXIT_CODE})")
      break
    if will_save:
      save(done)
  bar.close()
  return state, preempted


def _report(trainer, config, state, workdir: str, writer, is_main: bool) -> Dict[str, Any]:
  """The held-out figures: printed, written to workdir/eval.json, a grid in TensorBoard."""
  photos = heldout.eval_photos(config)
  params = host_params(trainer, trainer.eval_params(state))
  results = heldout.evaluate(trainer.model, params, photos, config.rd.lambdas,
                             config.granularity.ratios, config.eval.image_size)
  if is_main:
    step = int(jax.device_get(state["step"]))
    (epath.Path(workdir) / "eval.json").write_text(
        json.dumps(dict(step=step, results=results), indent=1))
    print(heldout.format_eval(results))
    batch = np.stack([heldout.center_crop(p, config.eval.image_size) for p in photos.values()])
    recon = jax.device_get(heldout.eval_forward(
        trainer.model, params, batch, float(config.rd.lmbda),
        jnp.asarray(config.granularity.ratios)))[0]
    writer.images(step, "heldout/original_vs_recon", heldout.image_grid(batch, recon))
  return results


def _trainer_fields(config) -> Dict[str, Any]:
  """The settings a Trainer is built from (not logging, checkpointing, data or eval)."""
  flat = flatten(json.loads(config.to_json()))
  loop_only = ("train.log_every", "train.ckpt_every", "train.keep", "train.keep_best",
               "train.async_checkpoint", "train.max_bad_steps", "data.*", "eval.*", "codec.*")
  return {k: v for k, v in flat.items() if not matches(k, loop_only)}


class _Preemption:
  """SIGTERM (preemption, scancel, TPU maintenance) -> save a checkpoint and stop.

  One process: our own SIGTERM handler. Several: JAX's preemption sync point, so every
  process stops at the same step and the collective save cannot deadlock.
  """

  def __init__(self):
    self.flag = False
    self._old = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.flag

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def host_params(trainer: "Trainer", params):
  """Params as host numpy on every process (gathered when sharded over processes)."""
  rep = sharding.replicated(trainer.mesh)
  return jax.device_get(jax.jit(lambda p: p, out_shardings=rep)(params))


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when no float leaf holds NaN or Inf (the largest |value| is finite: NaN
  propagates through max)."""
  peaks = [jnp.max(jnp.abs(a)) for a in jax.tree.leaves(tree)
           if jnp.issubdtype(a.dtype, jnp.floating) and a.size]
  return jnp.isfinite(functools.reduce(jnp.maximum, peaks)) if peaks else jnp.bool_(True)
