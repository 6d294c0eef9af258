"""Orbax checkpoints behind one small interface: train state + data iterator + config.

Async saves; keep the newest `keep` and the best `keep_best` by a metric (finite values
only); atomic by Orbax's temporary-directory-then-rename protocol (on object stores, a
commit marker), so a kill during a save leaves the previous checkpoint readable (the
half-written one is ignored).

Directories may be local paths or URLs (`gs://bucket/run/checkpoints`): URLs are passed
to Orbax as they are (it writes them through TensorStore and etils.epath), local paths
are made absolute. Every other file access here goes through `etils.epath`.
"""
import json
import math
import os
import warnings
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm


class CheckpointMismatch(ValueError):
  """A checkpoint that does not fit this run (shapes, structure); the message says why."""


def is_url(path) -> bool:
  """`gs://...`, `s3://...`: a path that must never go through os.path."""
  return "://" in str(path)


def normalize(path) -> str:
  """Absolute local path, or the URL unchanged (no trailing slash)."""
  path = os.fspath(path) if not isinstance(path, str) else path
  if is_url(path):
    return path.rstrip("/")
  return os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  """Join path parts the same way for local paths and URLs."""
  return str(epath.Path(base).joinpath(*parts)) if is_url(base) else os.path.join(base, *parts)


def find_checkpoints(path: str) -> Optional[str]:
  """A training workdir or its `checkpoints/` folder (local or URL) -> the checkpoints
  folder, or None when neither exists."""
  p = epath.Path(normalize(path))
  if (p / "checkpoints").is_dir():
    return normalize(str(p / "checkpoints"))
  if p.is_dir():
    return normalize(str(p))
  return None


def _finite_metrics(metrics):
  """Metrics only when every value is a finite number: a NaN never ranks as "best"."""
  if not metrics:
    return None
  try:
    if all(math.isfinite(float(v)) for v in metrics.values()):
      return {k: float(v) for k, v in metrics.items()}
  except (TypeError, ValueError):
    pass
  return None


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, keep_best: int = 0,
               best_metric: str = "bpp", best_mode: str = "min", async_save: bool = True):
    policies = [cm.preservation_policy.LatestN(n=keep)]
    if keep_best:
      # Checkpoints saved without (finite) metrics are not candidates; LatestN keeps the
      # recent ones of them.
      policies.append(cm.preservation_policy.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.directory = normalize(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iter=None, config=None, metrics=None,
           force: bool = False) -> bool:
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    return self._mngr.save(step, args=ocp.args.Composite(**items),
                           metrics=_finite_metrics(metrics), force=force)

  def data_file(self, step: int, process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> epath.Path:
    """Where grain keeps this process's iterator state in checkpoint `step`."""
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    return epath.Path(self.directory) / str(step) / "data" / f"process_{i}-of-{n}.json"

  def restore(self, step: Optional[int], abstract_state: Any, data_iter=None):
    """Restore `state` (shaped/sharded like `abstract_state`) and the iterator in place.

    The iterator is restored when this process's file exists in the checkpoint. A
    checkpoint from `hvq import` has none, and grain names the file by process count
    (`process_{i}-of-{n}.json`), so after a change of process count the data starts
    afresh (a warning says so) while the model state reshards onto the new mesh.
    """
    step = self.latest_step() if step is None else step
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    self.data_restored = False
    if data_iter is not None:
      data_dir = epath.Path(self.directory) / str(step) / "data"
      if self.data_file(step).exists():
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        self.data_restored = True
      elif data_dir.exists():
        saved = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
        warnings.warn(
            f"checkpoint step {step} holds the data iterator of another process layout "
            f"({', '.join(saved[:4])}{'...' if len(saved) > 4 else ''}); this run has "
            f"{jax.process_count()} process(es): the data stream starts afresh", stacklevel=2)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatch(
          f"{self.directory}/{step} does not fit this run's training state "
          f"({type(e).__name__}: {str(e)[:500]})") from None
    return out["state"]

  def restore_params(self, step: Optional[int], abstract: Any) -> Any:
    """Partial restore of the `state` item: only the subtrees of `abstract` (e.g.
    {"params": ...}), without building optimisers or knowing the rest of the state."""
    step = self.latest_step() if step is None else step
    path = join(self.directory, str(step), "state")
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    with ocp.PyTreeCheckpointer() as ck:
      return ck.restore(path, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=restore_args, partial_restore=True))

  def restore_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.close()
