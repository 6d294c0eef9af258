"""Checksums of what a checkpoint holds, recorded by every save and checked by every restore.

Why this is not left to Orbax: Orbax 0.12 and TensorStore 0.1 (as installed) check the
structure they walk, not the array bytes. OCDBT ends its manifest, version-tree and
B+tree nodes in a CRC-32C (TensorStore's OCDBT format spec), so a damaged node fails to
decode, but the out-of-line values those nodes point to (the arrays) are raw bytes; the
zarr v2 chunks Orbax writes by default carry no checksum, and zarr v3's crc32c (Orbax's
`use_zarr3`) covers only the shard index. A flipped byte in array data reads back as
another number, with no error. Neither checks the JSON items (config, data iterator).

What is recorded (the `integrity` item, a JSON item saved in the same Orbax `save` as the
rest, so it lands atomically with it): crc32 of every train-state array (its bytes in C
order, little-endian, with its shape and dtype), of each process's data iterator file and
of the config as JSON, and a checksum of the record itself (a damaged record is named as
such, not as a damaged array). The checksum is CRC-32C (google-crc32c's C extension,
hardware CRC: about 6 GB/s on one core; zlib's crc32 2.0, sha256 1.0, blake2b 0.8 on the
same CPU), or zlib's crc32 where that extension is missing (the record names which): a CRC
finds every burst of up to 32 flipped bits. This is against damage, not tampering.

Several processes: every array is checksummed whole. A fully addressable array (one
process, or replicated over all of them) is read from this process's copy; an array split
over processes (FSDP across hosts) is first gathered (`process_allgather`), so every
process computes the same record (process 0's copy is written) and restores verify on any
mesh, whatever mesh wrote the step. The gather costs one extra all-gather of the sharded
arrays per save and restore: right for states that fit one host's memory.
"""
import json
import warnings
import zlib
from typing import Any, Dict, Iterable, Optional

import numpy as np

FORMAT = 1
ITEM = "integrity"   # the Composite item's name (a folder of each step)


class CheckpointCorrupt(ValueError):
  """A checkpoint step that fails its checksums or cannot be read: the message names the
  step, the item and what is wrong."""


try:
  from google_crc32c import cext as _crc32c
except ImportError:   # no C extension: zlib's crc32 (a third of the speed)
  _crc32c = None

ALGORITHM = "crc32c" if _crc32c is not None else "crc32"


def _crc(data, algorithm: str = None) -> int:
  """`data`: bytes or a uint8 numpy array."""
  algorithm = algorithm or ALGORITHM
  if algorithm == "crc32":
    return zlib.crc32(data) & 0xFFFFFFFF
  if algorithm != "crc32c":
    raise ValueError(f"unknown checksum {algorithm!r}")
  if _crc32c is not None:
    return int(_crc32c.value(data))
  import google_crc32c   # a record written where the extension was: the slow pure Python
  return int(google_crc32c.value(bytes(data)))


def array_bytes(a: np.ndarray) -> np.ndarray:
  """The array's bytes in C order, little-endian (the checksummed form), as uint8."""
  a = np.ascontiguousarray(a)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return a.reshape(-1).view(np.uint8)


def array_entry(a, algorithm: str = None) -> Dict[str, Any]:
  a = np.asarray(a)
  return dict(crc=_crc(array_bytes(a), algorithm), shape=list(a.shape), dtype=str(a.dtype))


def text_crc(text, algorithm: str = None) -> int:
  return _crc(text.encode() if isinstance(text, str) else bytes(text), algorithm)


def canonical_json(obj) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def host_array(x) -> np.ndarray:
  """The whole array on this host: this process's copy, or gathered when it is split over
  processes (a collective: every process must call it for the same arrays)."""
  import jax
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def leaves(tree) -> Dict[str, Any]:
  """{key path: leaf} (jax.tree_util.keystr, e.g. "['params']['conv']['kernel']")."""
  import jax
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def host_leaves(tree) -> Dict[str, np.ndarray]:
  """{key path: the whole array on this host}: one `device_get` for all fully addressable
  leaves (their copies overlap), a gather for each array split over processes."""
  import jax
  flat = leaves(tree)
  split = {k for k, v in flat.items() if isinstance(v, jax.Array) and not v.is_fully_addressable}
  local = jax.device_get({k: v for k, v in flat.items() if k not in split})
  return {k: host_array(v) if k in split else np.asarray(local[k]) for k, v in flat.items()}


def state_entries(tree) -> Dict[str, Dict[str, Any]]:
  return {k: array_entry(a) for k, a in host_leaves(tree).items()}


def record(state, data_crcs: Optional[Dict[str, int]], config: Optional[dict]) -> dict:
  """The integrity item of one save (`state`: the train state as saved)."""
  body = dict(format=FORMAT, algorithm=ALGORITHM, state=state_entries(state),
              data=dict(data_crcs or {}),
              config=None if config is None else text_crc(canonical_json(config)))
  # the record's own checksum is always zlib's crc32: readable before the algorithm is
  return dict(body=body, crc32=text_crc(canonical_json(body), "crc32"))


def body_of(rec: Any, where: str) -> dict:
  """The record's body once its own checksum holds; CheckpointCorrupt otherwise."""
  if not isinstance(rec, dict) or not isinstance(rec.get("body"), dict):
    raise CheckpointCorrupt(f"{where}: integrity: the checksum record is unreadable")
  if text_crc(canonical_json(rec["body"]), "crc32") != rec.get("crc32"):
    raise CheckpointCorrupt(f"{where}: integrity: the checksum record fails its own checksum")
  body = rec["body"]
  if body.get("format") != FORMAT or body.get("algorithm") not in ("crc32", "crc32c"):
    raise CheckpointCorrupt(f"{where}: integrity: unknown record format "
                            f"{body.get('format')!r}/{body.get('algorithm')!r}")
  return body


def check_fits(body: dict, abstract, where: str) -> Optional[str]:
  """Why the arrays of `abstract` (key paths, shapes) do not fit the recorded ones, or None."""
  import jax
  want = leaves(abstract)
  have = body["state"]
  missing = [k for k in want if k not in have]
  if missing:
    return f"the checkpoint has no {missing[0]}" + (
        f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
  for k, a in want.items():
    shape = tuple(getattr(a, "shape", np.shape(a)))
    if tuple(have[k]["shape"]) != shape:
      return f"{k} has shape {tuple(have[k]['shape'])} in the checkpoint, {shape} in this run"
  return None


def verify_arrays(body: dict, tree, where: str, item: str = "state") -> None:
  """Raise CheckpointCorrupt naming the first array of `tree` (restored) whose bytes differ
  from the recorded checksum. Arrays restored to another dtype than saved are skipped."""
  bad = []
  for k, a in host_leaves(tree).items():
    rec = body["state"].get(k)
    if rec is None:
      continue
    if str(a.dtype) != rec["dtype"]:
      continue
    if (list(a.shape) != list(rec["shape"])
        or _crc(array_bytes(a), body["algorithm"]) != rec["crc"]):
      bad.append(k)
  if bad:
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise CheckpointCorrupt(f"{where}: {item}: array {bad[0]}{more} fails its checksum")


def verify_text(body: dict, section: str, name: Optional[str], text, where: str) -> None:
  """The data iterator file `name` (section "data") or the config (section "config",
  `text`: its canonical JSON) against the record; recorded-but-absent is damage too."""
  want = body.get(section)
  if section == "data":
    want = (want or {}).get(name)
  if want is None:
    return
  if text is None:
    raise CheckpointCorrupt(f"{where}: {section}: {name or 'the item'} is missing")
  if text_crc(text, body["algorithm"]) != want:
    raise CheckpointCorrupt(f"{where}: {section}: {name or 'the item'} fails its checksum")


_warned = set()


def warn_unverified(directory: str, step: int) -> None:
  """Once per folder: steps saved before checksums existed load unverified."""
  if directory in _warned:
    return
  _warned.add(directory)
  warnings.warn(f"checkpoint step {step} in {directory} has no checksums (saved before they "
                f"were recorded): it loads unverified", stacklevel=3)


def describe_error(e: BaseException) -> str:
  """One line of an Orbax / TensorStore error (their messages run to many lines)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# TensorStore / IO failures, as opposed to a tree that does not fit this run.
_DAMAGE_WORDS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "Error reading",
                 "Error opening", "Error decoding", "corrupt", "truncated", "Unexpected end",
                 "No such file", "does not exist", "Expecting", "JSONDecodeError", "checksum",
                 "Invalid", "invalid")


def looks_damaged(e: BaseException) -> bool:
  if isinstance(e, (OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError)):
    return True
  text = str(e)
  return any(w in text for w in _DAMAGE_WORDS)


def agree(ok: bool) -> bool:
  """True only where every process says True (one process's damaged file stops all)."""
  import jax
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(ok)))))


def gather_crcs(crc: int) -> Iterable[int]:
  """This process's data-file crc32, and every other process's (in process order)."""
  import jax
  if jax.process_count() == 1:
    return [crc]
  from jax.experimental import multihost_utils
  return [int(v) for v in np.asarray(multihost_utils.process_allgather(
      np.asarray([crc], np.uint32))).reshape(-1)]
