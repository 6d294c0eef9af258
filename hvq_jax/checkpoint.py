"""Orbax checkpoints behind one small interface: train state + data iterator + config.

Async saves; keep the newest `keep` and the best `keep_best` by a metric; atomic by
Orbax's temporary-directory-then-rename protocol, so a kill during a save leaves the
previous checkpoint readable (the half-written one is ignored).
"""
import json
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, keep_best: int = 0,
               best_metric: str = "bpp", best_mode: str = "min", async_save: bool = True):
    policies = [cm.preservation_policy.LatestN(n=keep)]
    if keep_best:
      policies.append(cm.preservation_policy.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.directory = os.path.abspath(directory)
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
    return self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: Optional[int], abstract_state: Any, data_iter=None):
    """Restore `state` (shaped/sharded like `abstract_state`) and the iterator in place."""
    step = self.latest_step() if step is None else step
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    # A checkpoint made by `hvq import` has no iterator state: the data starts afresh.
    if data_iter is not None and os.path.isdir(os.path.join(self.directory, str(step), "data")):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return out["state"]

  def restore_params(self, step: Optional[int], abstract: Any) -> Any:
    """Partial restore of the `state` item: only the subtrees of `abstract` (e.g.
    {"params": ...}), without building optimisers or knowing the rest of the state."""
    step = self.latest_step() if step is None else step
    path = os.path.join(self.directory, str(step), "state")
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
