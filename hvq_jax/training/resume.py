"""Where a run's state comes from: its newest checkpoint (with the config diff checked), or
a fresh init, optionally with another run's params (`train.init_from`)."""
import json
import warnings
from typing import Any, Dict, Tuple

import numpy as np
import jax

import ml_collections

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax import checkpoint_integrity as integrity
from hvq_jax.configs import upgrade
from hvq_jax.nn import model as model_lib
from hvq_jax.training import phases


# Settings that may change when a run resumes: they touch neither the saved state's shapes
# nor what the run computes per step (num_steps stretches the cosine decay to the new end).
SAFE_ON_RESUME = ("train.num_steps", "train.init_from", "train.log_every", "train.ckpt_every", "train.keep",
                  "train.keep_best", "train.async_checkpoint", "train.max_bad_steps",
                  "data.num_workers", "data.worker_buffer_size", "data.read_threads",
                  "data.device_prefetch",
                  "data.train_dir", "data.eval_dir", "data.tfds_data_dir",
                  "loss.lpips_weights", "eval.*", "mesh.*", "codec.*")
# Settings that shape the saved state: a checkpoint made with others cannot be restored.
STRUCTURAL = ("model.*", "disc.ch", "disc.n_layers")
# Settings that define the data stream: changed (with --allow_config_change), the
# data iterator starts afresh.
DATA_DEFINING = ("seed", "image_size", "train.batch_size", "data.source", "data.tfds_name",
                 "data.tfds_split", "data.min_scale", "data.flip", "data.color_hue_deg",
                 "data.color_saturation", "data.color_permute")


def matches(key: str, patterns) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(stored: Dict[str, Any], config) -> Dict[str, list]:
  """Fields whose value differs between a checkpoint's config and this run's, sorted into
  `structural` (cannot restore), `changes` (restorable, but the run computes something
  else: needs allow_config_change) and `safe`. Each entry: (field, stored, new).
  Fields only one side has (added or removed by a newer version) are not compared."""
  old = flatten(stored)
  new = flatten(json.loads(config.to_json()))
  out = dict(structural=[], changes=[], safe=[])
  for k in sorted(set(old) & set(new)):
    a, b = old[k], new[k]
    if a == b:
      continue
    if matches(k, SAFE_ON_RESUME):
      out["safe"].append((k, a, b))
    elif matches(k, STRUCTURAL) or (k == "train.ema_decay" and (a > 0) != (b > 0)):
      out["structural"].append((k, a, b))
    else:
      out["changes"].append((k, a, b))
  return out


def phase_change(stored: Dict[str, Any], config) -> list:
  """[("train phases", stored, new)] when the recipe's phases start at other steps or in
  another order (`phases.plan`; a later end of the last phase alone is a longer run)."""
  layout = lambda ps: [(p.name, p.start) for p in ps] + [p.end for p in ps[:-1]]
  old, new = phases.plan(ml_collections.ConfigDict(stored)), phases.plan(config)
  if layout(old) == layout(new):
    return []
  return [("train phases", phases.describe(old), phases.describe(new))]


def check_resume_config(stored: Dict[str, Any], config, allow_config_change: bool,
                        where: str) -> Dict[str, list]:
  """Raise ConfigError naming every differing field unless the change is allowed."""
  diff = config_changes(stored, config)
  diff["changes"] += phase_change(stored, config)
  fmt = lambda items: "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in items)
  safe_list = ", ".join(SAFE_ON_RESUME)
  if diff["structural"]:
    raise model_lib.ConfigError(
        f"cannot resume {where}: its checkpoint was made with another model, so its arrays "
        f"have other shapes:\n{fmt(diff['structural'])}\nUse the config the run was started "
        f"with (the checkpoint's config is restored by `hvq eval`/`hvq compress`), or start "
        f"a new --workdir. Safe to change on resume: {safe_list}")
  if diff["changes"] and not allow_config_change:
    raise model_lib.ConfigError(
        f"resuming {where} with settings that differ from its checkpoint:\n"
        f"{fmt(diff['changes'])}\nThese change what the run computes. Pass the values the run "
        f"was started with, or --allow_config_change to continue with the new ones. "
        f"Safe to change on resume: {safe_list}")
  return diff


def init_from(params, source: str):
  """Params of the run at `source` (workdir or checkpoints folder) copied into `params`
  wherever name and shape match; the rest keep their init. Returns (params, report)."""
  from hvq_jax import codec
  _, theirs = codec.load_params(source)
  theirs = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      jax.device_get(theirs))[0]}
  report = dict(loaded=[], kept_init=[], shape_mismatch=[])
  def pick(path, leaf):
    k = jax.tree_util.keystr(path)
    if k not in theirs:
      report["kept_init"].append(k)
      return leaf
    if np.shape(theirs[k]) != np.shape(leaf):
      report["shape_mismatch"].append(k)
      return leaf
    report["loaded"].append(k)
    return np.asarray(theirs[k], np.asarray(leaf).dtype)
  new = jax.tree_util.tree_map_with_path(pick, jax.device_get(params))
  report["unused"] = sorted(set(theirs) - set(report["loaded"]) - set(report["shape_mismatch"]))
  return new, report


def restore_or_init(ckpt, trainer, config, data_iter, allow_config_change: bool,
                    where: str) -> Tuple[Dict[str, Any], int]:
  """(state, step) to train on from: the newest intact checkpoint in `ckpt` restored onto
  this run's mesh (whatever mesh wrote it: Orbax reshards), its data iterator too unless
  the data stream's definition changed; or, in an empty workdir, a fresh state (params
  from `train.init_from` where set), saved at once as step 0.

  A step that fails its checksums or cannot be read is named in a warning and skipped;
  once an older step restores, the damaged newer ones are moved aside (never deleted:
  `Checkpointer.set_aside`), so the run saves those steps again. When no step is intact
  it raises CheckpointCorrupt naming each."""
  is_main = jax.process_index() == 0
  steps = sorted(ckpt.all_steps(), reverse=True)
  if not steps:
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
    if config.train.init_from:
      state = _params_from(trainer, state, config, is_main)
    # A restored step is never saved again (Orbax refuses a step that exists): the initial
    # checkpoint is written once, only here.
    ckpt.save(0, state, data_iter, config, metrics=None, force=True)
    return state, 0
  damaged = []
  for step in steps:
    err = None
    try:
      state, diff, restart_data = _restore_step(ckpt, step, trainer, config, data_iter,
                                                allow_config_change, where)
    except ckpt_lib.CheckpointCorrupt as e:
      err = e
    if integrity.agree(err is None):
      break
    damaged.append(step)
    if is_main:
      warnings.warn(f"{err or f'checkpoint step {step}: damaged on another process'}; "
                    f"skipped", stacklevel=2)
  else:
    raise ckpt_lib.CheckpointCorrupt(
        f"no intact checkpoint in {ckpt.directory} (steps {', '.join(map(str, steps))} are "
        f"all damaged: see the warnings above); nothing was changed")
  if damaged and is_main:
    for step in damaged:
      dest = ckpt.set_aside(step)
      print(f"moved damaged checkpoint step {step} to {dest}")
  if damaged and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("set aside damaged checkpoints")
    if not is_main:
      ckpt.reload()
  start = int(jax.device_get(state["step"]))
  if is_main:
    now = [p.name for p in trainer.phases if p.start <= start < p.end]
    print(f"resumed from step {start} in {ckpt.directory}"
          + (f" (phase {now[0]})" if now and len(trainer.phases) > 1 else ""))
    for k, a, b in diff["safe"] + diff["changes"]:
      print(f"  {k}: {a!r} -> {b!r}")
    if restart_data:
      print("  the data stream starts afresh (its definition changed)")
  return state, start


def _restore_step(ckpt, step: int, trainer, config, data_iter, allow_config_change: bool,
                  where: str):
  """(state, config diff, data restarted) of checkpoint `step`; CheckpointCorrupt when it
  is damaged, ConfigError / CheckpointMismatch when it does not fit this run."""
  try:
    stored = json.loads(upgrade.upgrade(ckpt.restore_config(step)).to_json())
  except ckpt_lib.CheckpointCorrupt:
    raise
  except Exception:   # noqa: BLE001 (a checkpoint from before configs were saved)
    stored = None
  diff = dict(safe=[], changes=[])
  if stored is not None:
    diff = check_resume_config(stored, config, allow_config_change, where)
  restart_data = any(matches(k, DATA_DEFINING) for k, _, _ in diff["changes"])
  state = ckpt.restore(step, trainer.abstract_state, None if restart_data else data_iter)
  return state, diff, restart_data


def _params_from(trainer, state, config, is_main: bool) -> Dict[str, Any]:
  new, report = init_from(state["params"], config.train.init_from)
  new = jax.device_put(new, trainer.state_shardings["params"])
  if is_main:
    print(f"initialised from {config.train.init_from}: {len(report['loaded'])} arrays loaded, "
          f"{len(report['kept_init'])} at init, {len(report['shape_mismatch'])} of "
          f"another shape kept at init, {len(report['unused'])} unused")
  return dict(state, params=new,
              ema_params=new if config.train.ema_decay > 0 else state["ema_params"])
