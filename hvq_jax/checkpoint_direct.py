"""A local checkpoint's config and params read straight through TensorStore, without Orbax.

`hvq compress`/`decompress` load a model this way in tens of milliseconds; anything these
readers do not recognise makes them return None, and the caller restores through
`checkpoint.Checkpointer`, which also words the errors.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

from hvq_jax import checkpoint_integrity as integrity
from hvq_jax.checkpoint import array_names, nest, is_url, normalize, read_integrity, where
from hvq_jax.checkpoint_integrity import CheckpointCorrupt

# What Orbax (0.11-0.12) writes for `Checkpointer.save` on a local disk, and reads back:
#   DIR/<step>/                       a finalised step (unfinished ones carry a suffix)
#   DIR/<step>/commit_success.txt
#   DIR/<step>/config/metadata        the JSON config item
#   DIR/<step>/state/_METADATA        tree metadata: every leaf's key path and value type
#   DIR/<step>/state/manifest.ocdbt   an OCDBT database holding one zarr array per leaf,
#                                     named by its key path joined with "."
# `local_step_config` and `read_params` read exactly that through TensorStore (Orbax's own
# storage layer) in a few tens of milliseconds, without importing Orbax (~0.3 s) or
# running its restore machinery (~0.5 s for a model's params). Anything else they do not
# recognise makes them return None, and the caller restores through `Checkpointer`:
# wherever they answer, the answer is Orbax's (tests/test_codec_load.py checks).


def local_step_config(directory: str, step: Optional[int] = None) -> Optional[Tuple[int, dict]]:
  """(step, config dict) of the newest (or the given) finalised step of a local checkpoints
  folder, read without Orbax; None when it is a URL, holds no such step, or the step is
  not laid out as expected (then ask `Checkpointer`, which also words the errors)."""
  if is_url(directory):
    return None
  try:
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  except OSError:
    return None
  if step is None:
    if not steps:
      return None
    step = max(steps)
  elif int(step) not in steps:
    return None
  d = os.path.join(directory, str(int(step)))
  body = read_integrity(directory, int(step))
  try:
    if not os.path.isfile(os.path.join(d, "commit_success.txt")):
      return None
    with open(os.path.join(d, "config", "metadata")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    if body is not None and body.get("config") is not None:
      raise CheckpointCorrupt(f"{where(directory, step)}: config: cannot be read") from None
    return None
  if body is not None and isinstance(config, dict):
    integrity.verify_text(body, "config", None, integrity.canonical_json(config),
                          where(directory, step))
  return (int(step), config) if isinstance(config, dict) else None


def read_params(directory: str, step: int, key: str = "params") -> Optional[dict]:
  """Subtree `key` of step `step`'s `state` item as nested dicts of numpy arrays, read
  straight through TensorStore from a local checkpoints folder, checked against the
  step's checksums; None when the checkpoint is not laid out as `local_step_config`
  describes, or a read fails in a step without checksums (Orbax then says what is wrong).
  A step with checksums whose arrays fail to read or to verify raises CheckpointCorrupt."""
  if is_url(directory):
    return None
  body = read_integrity(normalize(directory), int(step))
  state = os.path.join(normalize(directory), str(int(step)), "state")
  try:
    with open(os.path.join(state, "_METADATA")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  if meta.get("use_ocdbt") is not True:
    return None
  names = array_names(meta, key)
  if names is None:
    return None
  try:
    import tensorstore as ts
    ctx = ts.Context({"file_io_concurrency": {"limit": 128},
                      "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
    base = {"driver": "ocdbt", "base": {"driver": "file", "path": state + "/"},
            "cache_pool": "cache_pool#ocdbt"}
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    opened = {p: ts.open({"driver": driver, "kvstore": dict(base, path=name)}, open=True,
                         read=True, context=ctx) for p, name in names.items()}
    stores = {p: f.result() for p, f in opened.items()}
    reads = {p: s.read() for p, s in stores.items()}
    out = nest({p: r.result() for p, r in reads.items()})
  except Exception as e:   # noqa: BLE001
    if body is not None:   # the record lists these arrays: they are damaged
      raise CheckpointCorrupt(f"{where(normalize(directory), step)}: state: cannot be read "
                              f"({integrity.describe_error(e)})") from None
    return None            # a layout this reader does not know: Orbax will say what is wrong
  if body is not None:
    integrity.verify_arrays(body, {key: out}, where(normalize(directory), step))
  return out
