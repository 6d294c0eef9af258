"""Orbax checkpoints behind one small interface: train state + data iterator + config.

Async saves; keep the newest `keep` and the best `keep_best` by a metric (finite values
only); atomic by Orbax's temporary-directory-then-rename protocol (on object stores, a
commit marker), so a kill during a save leaves the previous checkpoint readable (the
half-written one is ignored). Every save records checksums of what it holds and every
restore checks them (`checkpoint_integrity.py`): a damaged step raises CheckpointCorrupt,
one line naming the step, the item and what is wrong.

Directories may be local paths or URLs (`gs://bucket/run/checkpoints`): URLs are passed
to Orbax as they are (it writes them through TensorStore and etils.epath), local paths
are made absolute. Every other file access here goes through `etils.epath`.

Orbax, grain and etils are imported only where used: `checkpoint_direct` reads the params of a
local checkpoint straight through TensorStore (what Orbax does underneath), so loading a
model for `hvq compress`/`decompress` imports none of them.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple


from hvq_jax import checkpoint_integrity as integrity
from hvq_jax.checkpoint_integrity import CheckpointCorrupt  # noqa: F401  (re-exported)

if TYPE_CHECKING:
  from etils import epath

TMP_SUFFIX = ".orbax-checkpoint-tmp"   # Orbax's unfinished saves: `<step>.orbax-checkpoint-tmp*`


def jax_process_index() -> int:
  import jax
  return jax.process_index()


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
  if not is_url(base):
    return os.path.join(base, *parts)
  from etils import epath
  return str(epath.Path(base).joinpath(*parts))


def find_checkpoints(path: str) -> Optional[str]:
  """A training workdir or its `checkpoints/` folder (local or URL) -> the checkpoints
  folder, or None when neither exists."""
  if not is_url(path):
    p = normalize(path)
    if os.path.isdir(os.path.join(p, "checkpoints")):
      return os.path.join(p, "checkpoints")
    return p if os.path.isdir(p) else None
  from etils import epath
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


def _read_text(path: str) -> Optional[str]:
  """A file's text (local or URL), or None when it does not exist."""
  try:
    if not is_url(path):
      with open(path, encoding="utf-8") as f:
        return f.read()
    from etils import epath
    p = epath.Path(path)
    return p.read_text() if p.exists() else None
  except FileNotFoundError:
    return None


def _exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  from etils import epath
  return epath.Path(path).exists()


def where(directory: str, step) -> str:
  return f"checkpoint step {step} in {directory}"


def read_integrity(directory: str, step: int) -> Optional[dict]:
  """The verified body of step `step`'s checksum record; None for a step saved before
  records existed (warned once per folder). A record that is missing from a step saved
  with one (its `_CHECKPOINT_METADATA` lists the item), unreadable or failing its own
  checksum raises CheckpointCorrupt."""
  step_dir = join(directory, str(int(step)))
  w = where(directory, step)
  try:
    text = _read_text(join(step_dir, integrity.ITEM, "metadata"))
  except (OSError, UnicodeDecodeError):
    raise CheckpointCorrupt(f"{w}: integrity: the checksum record cannot be read") from None
  if text is None:
    listed = _exists(join(step_dir, integrity.ITEM))
    try:
      meta = json.loads(_read_text(join(step_dir, "_CHECKPOINT_METADATA")) or "{}")
      listed = listed or integrity.ITEM in (meta.get("item_handlers") or {})
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
      pass
    if listed:
      raise CheckpointCorrupt(f"{w}: integrity: the checksum record is missing")
    integrity.warn_unverified(directory, step)
    return None
  try:
    rec = json.loads(text)
  except ValueError:
    raise CheckpointCorrupt(f"{w}: integrity: the checksum record is unreadable") from None
  return integrity.body_of(rec, w)


def _grain_text(item) -> str:
  """The text grain's CheckpointHandler writes for `item` (what its checksum covers)."""
  try:
    from grain._src.python.dataset import dataset
    if isinstance(item, dataset.DatasetIterator):
      return json.dumps(item.get_state(), indent=4)
  except ImportError:
    pass
  return item.get_state().decode()


def _unfinished(directory: str):
  """Names of unfinished saves (`<step>.orbax-checkpoint-tmp*`) in a checkpoints folder."""
  try:
    if not is_url(directory):
      names = os.listdir(directory)
    else:
      from etils import epath
      p = epath.Path(directory)
      names = [c.name for c in p.iterdir()] if p.is_dir() else []
  except OSError:
    return []
  return sorted(n for n in names if TMP_SUFFIX in n)


def _step_numbers(directory: str):
  try:
    if not is_url(directory):
      names = os.listdir(directory)
    else:
      from etils import epath
      names = [c.name for c in epath.Path(directory).iterdir()]
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def _damaged_step_metadata(directory: str):
  """[(step, why)] for the steps whose `_CHECKPOINT_METADATA` parses as JSON but not as
  Orbax's step metadata (unparseable JSON Orbax logs and passes over)."""
  from orbax.checkpoint._src.metadata import step_metadata_serialization as sms
  out = []
  for step in _step_numbers(directory):
    try:
      text = _read_text(join(directory, str(step), "_CHECKPOINT_METADATA"))
      meta = json.loads(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
      continue
    try:
      if meta is not None:
        sms.deserialize(meta)
    except Exception as e:   # noqa: BLE001
      out.append((step, integrity.describe_error(e)))
  return out


def _sync(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _silence_stray_reads() -> None:
  """After a failed Orbax restore, its other reads still finish in the background and
  report on an event loop Orbax has closed: asyncio logs "Future exception was never
  retrieved" and TensorStore's callbacks print "Event loop is closed" tracebacks, pages
  of them for one damaged file that is already named in one line. Dropped from then on."""
  import logging
  import sys
  if getattr(_silence_stray_reads, "done", False):
    return
  _silence_stray_reads.done = True
  logging.getLogger("asyncio").addFilter(
      lambda r: "Future exception was never retrieved" not in str(r.msg))
  previous = sys.unraisablehook
  def hook(u):
    if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
      return
    previous(u)
  sys.unraisablehook = hook


class Checkpointer:
  """`read_only`: a reader (the codec commands, `train.init_from`): it never creates the
  folder nor removes a writer's unfinished saves."""

  def __init__(self, directory: str, keep: int = 3, keep_best: int = 0,
               best_metric: str = "bpp", best_mode: str = "min", async_save: bool = True,
               read_only: bool = False):
    import grain
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm
    policies = [cm.preservation_policy.LatestN(n=keep)]
    if keep_best:
      # Checkpoints saved without (finite) metrics are not candidates; LatestN keeps the
      # recent ones of them.
      policies.append(cm.preservation_policy.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=keep_best,
          keep_checkpoints_without_metrics=False))
    self.directory = normalize(directory)
    # A writer (one per workdir: training/workdir_lock.py) removes the unfinished saves
    # of an interrupted run (Orbax's cleanup_tmp_directories); they are never read.
    left = [] if read_only else _unfinished(self.directory)
    if left and jax_process_index() == 0:
      warnings.warn(f"{self.directory}: removing {len(left)} unfinished save(s) of an "
                    f"interrupted run ({', '.join(left[:3])}{'...' if len(left) > 3 else ''})",
                    stacklevel=2)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=not read_only,
        cleanup_tmp_directories=not read_only, read_only=read_only)
    make = lambda: ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       integrity.ITEM: ocp.JsonCheckpointHandler()})
    try:
      self._mngr = make()
    except Exception:   # noqa: BLE001 (Orbax reads every step's metadata here)
      self._mngr = self._without_damaged_metadata(make, read_only)

  def _without_damaged_metadata(self, make, read_only: bool):
    """The manager, once the steps whose `_CHECKPOINT_METADATA` Orbax cannot read (it
    reads them all on creation, and one bad file stops it) are moved aside with a warning:
    a writer does so while another step's metadata reads, and refuses otherwise (so no
    damage ever makes a run start afresh); a reader refuses, naming the step."""
    bad = _damaged_step_metadata(self.directory)
    steps = _step_numbers(self.directory)
    if not bad:
      raise
    if read_only or len(bad) == len(steps):
      step, why = bad[0]
      raise CheckpointCorrupt(f"{self.where(step)}: step metadata: cannot be read ({why})"
                              + ("; choose another step with --step N" if read_only else
                                 f"; no step of {self.directory} has readable metadata"))
    if jax_process_index() == 0:
      for step, why in bad:
        dest = self._move_aside(step)
        warnings.warn(f"{self.where(step)}: step metadata: cannot be read ({why}); moved to "
                      f"{dest}", stacklevel=3)
    _sync("set aside steps with damaged metadata")
    return make()

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iter=None, config=None, metrics=None,
           force: bool = False) -> bool:
    import grain
    import orbax.checkpoint as ocp
    items = dict(state=ocp.args.StandardSave(state))
    data_crcs = cfg = None
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
      crcs = list(integrity.gather_crcs(integrity.text_crc(_grain_text(data_iter))))
      data_crcs = {f"process_{i}-of-{len(crcs)}.json": c for i, c in enumerate(crcs)}
    if config is not None:
      cfg = json.loads(config.to_json())
      items["config"] = ocp.args.JsonSave(cfg)
    # In the same save: the record lands (and is finalised) with the items it covers.
    items[integrity.ITEM] = ocp.args.JsonSave(integrity.record(state, data_crcs, cfg))
    return self._mngr.save(step, args=ocp.args.Composite(**items),
                           metrics=_finite_metrics(metrics), force=force)

  def where(self, step) -> str:
    return where(self.directory, step)

  def integrity(self, step: int) -> Optional[dict]:
    return read_integrity(self.directory, step)

  def _damage(self, step, item: str, e: BaseException) -> CheckpointCorrupt:
    _silence_stray_reads()
    return CheckpointCorrupt(f"{self.where(step)}: {item}: cannot be read "
                             f"({integrity.describe_error(e)})")

  def set_aside(self, step: int) -> str:
    """Move a damaged step out of the way (never delete it): to `<folder>.damaged/<step>`,
    where Orbax neither lists nor prunes it and a new save of that step is possible."""
    dest = self._move_aside(step)
    self._mngr.reload()
    return dest

  def _move_aside(self, step: int) -> str:
    from etils import epath
    src = epath.Path(self.directory) / str(int(step))
    dest_dir = epath.Path(self.directory + ".damaged")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest, n = dest_dir / str(int(step)), 1
    while dest.exists():
      dest, n = dest_dir / f"{int(step)}-{n}", n + 1
    src.rename(dest)
    return str(dest)

  def data_file(self, step: int, process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> "epath.Path":
    """Where grain keeps this process's iterator state in checkpoint `step`."""
    import jax
    from etils import epath
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
    import grain
    import jax
    import orbax.checkpoint as ocp
    from etils import epath
    step = self.latest_step() if step is None else step
    body = self.integrity(step)
    if body is not None:
      why = integrity.check_fits(body, abstract_state, self.where(step))
      if why:
        raise CheckpointMismatch(f"{self.directory}/{step} does not fit this run's training "
                                 f"state ({why})")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    self.data_restored = False
    if data_iter is not None:
      data_dir = epath.Path(self.directory) / str(step) / "data"
      name = self.data_file(step).name
      if self.data_file(step).exists():
        if body is not None:
          try:
            text = self.data_file(step).read_text()
          except (OSError, UnicodeDecodeError) as e:
            raise self._damage(step, "data", e) from None
          integrity.verify_text(body, "data", name, text, self.where(step))
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        self.data_restored = True
      elif body is not None and name in body.get("data", {}):
        raise CheckpointCorrupt(f"{self.where(step)}: data: {name} is missing")
      elif data_dir.exists():
        saved = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
        warnings.warn(
            f"checkpoint step {step} holds the data iterator of another process layout "
            f"({', '.join(saved[:4])}{'...' if len(saved) > 4 else ''}); this run has "
            f"{jax.process_count()} process(es): the data stream starts afresh", stacklevel=2)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:   # noqa: BLE001 (Orbax and TensorStore raise many kinds)
      # The record says the tree fits (checked above): a failure is damage. Without a
      # record, a TensorStore / IO error is damage, anything else a tree that does not fit.
      if body is not None or integrity.looks_damaged(e):
        raise self._damage(step, "state" if "data" not in items else "state/data", e) from None
      raise CheckpointMismatch(
          f"{self.directory}/{step} does not fit this run's training state "
          f"({type(e).__name__}: {str(e)[:500]})") from None
    if body is not None:
      integrity.verify_arrays(body, dict(out["state"]), self.where(step))
    return out["state"]

  def restore_params(self, step: Optional[int], abstract: Any) -> Any:
    """Partial restore of the `state` item: only the subtrees of `abstract` (e.g.
    {"params": ...}), without building optimisers or knowing the rest of the state."""
    import jax
    import orbax.checkpoint as ocp
    step = self.latest_step() if step is None else step
    body = self.integrity(step)
    path = join(self.directory, str(step), "state")
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    try:
      with ocp.PyTreeCheckpointer() as ck:
        out = ck.restore(path, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=True))
    except Exception as e:   # noqa: BLE001
      if body is not None or integrity.looks_damaged(e):
        raise self._damage(step, "state", e) from None
      raise
    if body is not None:
      integrity.verify_arrays(body, out, self.where(step))
    return out

  def restore_config(self, step: Optional[int] = None) -> dict:
    import orbax.checkpoint as ocp
    step = self.latest_step() if step is None else step
    body = self.integrity(step)
    try:
      config = self._mngr.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))["config"]
    except Exception as e:   # noqa: BLE001
      if body is not None and body.get("config") is not None:
        raise self._damage(step, "config", e) from None
      raise
    if body is not None:
      integrity.verify_text(body, "config", None, integrity.canonical_json(config),
                            self.where(step))
    return config

  def wait(self):
    self._mngr.wait_until_finished()

  def reload(self):
    """Forget the cached step list (after another process moved steps)."""
    self._mngr.reload()

  def close(self):
    self._mngr.close()

  def restore_subtree(self, step: Optional[int], key: str, sharding) -> Optional[Any]:
    """The `state` item's subtree `key` (e.g. "params") onto `sharding`, with the shapes
    and dtypes it was saved with: its structure comes from the checkpoint's tree metadata,
    so no abstract state (no model init) is built. None when the metadata does not list
    `key` as a tree of arrays (use `restore_params` with an abstract tree then)."""
    import orbax.checkpoint as ocp
    from etils import epath
    step = self.latest_step() if step is None else step
    body = self.integrity(step)
    path = join(self.directory, str(step), "state")
    try:
      meta = json.loads(epath.Path(join(path, "_METADATA")).read_text())
    except (OSError, ValueError):
      return None
    names = array_names(meta, key)
    if names is None:
      return None
    item = nest({k: 0 for k in names})
    restore_args = nest({k: ocp.ArrayRestoreArgs(sharding=sharding) for k in names})
    try:
      with ocp.PyTreeCheckpointer() as ck:
        out = ck.restore(path, args=ocp.args.PyTreeRestore(
            item={key: item}, restore_args={key: restore_args}, partial_restore=True))[key]
    except Exception as e:   # noqa: BLE001
      if body is not None or integrity.looks_damaged(e):
        raise self._damage(step, "state", e) from None
      raise
    if body is not None:
      integrity.verify_arrays(body, {key: out}, self.where(step))
    return out


# ---- Orbax's tree metadata -------------------------------------------------------------
_DICT_KEY = 2   # orbax KeyType.DICT in _METADATA's key_metadata


def array_names(meta: dict, key: str) -> Optional[Dict[Tuple[str, ...], str]]:
  """{key path below `key`: Orbax's array name} for the arrays of subtree `key` in a
  state item's _METADATA, or None when the subtree is absent or holds anything but
  dict-keyed jax.Arrays."""
  out = {}
  for entry in meta.get("tree_metadata", {}).values():
    km = entry.get("key_metadata") or []
    if not km or km[0].get("key") != key:
      continue
    vm = entry.get("value_metadata") or {}
    if (any(k.get("key_type") != _DICT_KEY for k in km) or vm.get("value_type") != "jax.Array"
        or vm.get("skip_deserialize")):
      return None
    keys = tuple(str(k["key"]) for k in km)
    out[keys[1:]] = ".".join(keys)
  return out or None


def nest(flat: Dict[Tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    d = tree
    for k in path[:-1]:
      d = d.setdefault(k, {})
    d[path[-1]] = v
  return tree
