"""Read a PyTorch `.pt`/`.pth` file of tensors into numpy, without torch and without
running code from the file.

Metric weights (DISTS's alpha/beta, the FID Inception network) and released tokenizers
(taming's and Control-GIC's Lightning checkpoints) come as torch pickles. `torch.load`
would need torch, and a pickle from elsewhere may call any function. This unpickler
admits only what a tensor file holds: dicts, OrderedDicts, storages and
`torch._utils._rebuild_tensor[_v2]` / `_rebuild_parameter` / `_rebuild_from_type_v2` of
plain tensors; anything else is refused, or, with `inert_unknown` (a Lightning
checkpoint's callback states, OmegaConf hyper-parameters), becomes an inert placeholder
(hvq_jax/safe_pickle.py): never imported, never called, dropped with everything but the
tensors.
Both torch layouts are read: the zip archive (torch >= 1.6) and the legacy stream
(magic number, protocol, sys info, the object pickle, storage keys, then each storage
as an int64 element count followed by its raw little-endian bytes).
"""
import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Dict

import numpy as np

from hvq_jax import safe_pickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}
_TENSOR_TYPES = ("torch.Tensor", "torch.nn.parameter.Parameter")


class TorchFileError(ValueError):
  """A torch file that is not a plain file of tensors, or is damaged."""


class _StorageType:
  def __init__(self, name):
    dtype = _STORAGE_DTYPES[name]
    if dtype == "bfloat16":   # numpy has none; ml_dtypes (a jax dependency) does
      import ml_dtypes
      dtype = ml_dtypes.bfloat16
    self.name, self.dtype = name, np.dtype(dtype)


class _TensorType:
  """torch.Tensor / nn.Parameter as `_rebuild_from_type_v2` names them: a marker."""

  def __init__(self, name):
    self.name = name


class _Storage:
  """A storage whose bytes may arrive after the pickle (legacy layout)."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.array = dtype, int(numel), None


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def materialise(self) -> np.ndarray:
    a = self.storage.array
    if a is None:
      raise TorchFileError("a tensor's storage is missing from the file")
    if not self.size:
      return np.array(a[self.offset])
    end = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if min(self.size) > 0 and end > a.size:
      raise TorchFileError("a tensor reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        a[self.offset:], self.size, tuple(s * a.itemsize for s in self.stride), writeable=False)
    return np.array(view)


class _PlainUnpickler(pickle.Unpickler):
  """For the legacy header and key list: plain values only."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain values")


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    raise TorchFileError("a tensor without a storage")
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  return data


def _rebuild_from_type(func, new_type, args, state=None):
  """torch's rebuilder of tensor subclasses, for plain tensors and Parameters only."""
  if isinstance(new_type, _TensorType) and func in _TensorUnpickler._CALLABLES.values():
    return func(*args)
  return safe_pickle.inert_class("torch._tensor._rebuild_from_type_v2")(func, new_type, args)


class _TensorUnpickler(pickle.Unpickler):
  _CALLABLES = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  }

  def __init__(self, f, storages, read_storage, inert_unknown: bool = False):
    super().__init__(f)
    self._storages, self._read_storage = storages, read_storage
    self.inert_unknown, self.seen_unknown = inert_unknown, []

  def find_class(self, module, name):
    if (module, name) in self._CALLABLES:
      return self._CALLABLES[(module, name)]
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
      return _rebuild_from_type
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if f"{module}.{name}" in _TENSOR_TYPES:
      return _TensorType(f"{module}.{name}")
    if self.inert_unknown:
      self.seen_unknown.append(f"{module}.{name}")
      return safe_pickle.inert_class(f"{module}.{name}")
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.60}")
    stype, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(stype, _StorageType):
      raise pickle.UnpicklingError("a storage of unknown type")
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
    if key not in self._storages:
      self._storages[key] = _Storage(stype.dtype, numel)
      self._read_storage(key, self._storages[key])
    return self._storages[key]


def _resolve(obj):
  if isinstance(obj, _Tensor):
    return obj.materialise()
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


def _load_zip(path: str, inert_unknown: bool):
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise TorchFileError(f"{path}: a zip file without one data.pkl (not a torch file)")
    root = pkl[0][:-len("data.pkl")]
    if f"{root}byteorder" in names and z.read(f"{root}byteorder").strip() != b"little":
      raise TorchFileError(f"{path}: big-endian torch files are not supported")

    def read(key, st):
      raw = z.read(f"{root}data/{key}")
      st.array = np.frombuffer(raw, st.dtype, count=st.numel).copy()

    unpickler = _TensorUnpickler(io.BytesIO(z.read(pkl[0])), {}, read, inert_unknown)
    return unpickler.load(), unpickler.seen_unknown


def _load_legacy(path: str, inert_unknown: bool):
  with open(path, "rb") as f:
    if _PlainUnpickler(f).load() != LEGACY_MAGIC:
      raise TorchFileError(f"{path}: not a torch file (no zip archive, no legacy magic number)")
    _PlainUnpickler(f).load()   # protocol version
    _PlainUnpickler(f).load()   # sys info: a dict of ints and bools
    storages = {}
    unpickler = _TensorUnpickler(f, storages, lambda key, st: None, inert_unknown)
    obj = unpickler.load()
    keys = _PlainUnpickler(f).load()
    if not isinstance(keys, list):
      raise TorchFileError(f"{path}: damaged legacy torch file (no storage key list)")
    for key in keys:
      st = storages.get(str(key))
      if st is None:
        raise TorchFileError(f"{path}: storage {key!r} listed but never used")
      (numel,) = struct.unpack("<q", f.read(8))
      raw = f.read(numel * st.dtype.itemsize)
      if numel != st.numel or len(raw) != numel * st.dtype.itemsize:
        raise TorchFileError(f"{path}: storage {key!r} is truncated")
      st.array = np.frombuffer(raw, st.dtype).copy()
    return obj, unpickler.seen_unknown


def _check_legacy_header(path):
  with open(path, "rb") as f:
    head = f.read(2)
  return head[:1] == b"\x80"


def load(path: str, inert_unknown: bool = False) -> Any:
  """The object a torch file holds (typically a state dict), tensors as numpy arrays. With
  `inert_unknown`: (object, the dotted names that became inert placeholders)."""
  try:
    if zipfile.is_zipfile(path):
      obj, inert = _load_zip(path, inert_unknown)
    elif _check_legacy_header(path):
      obj, inert = _load_legacy(path, inert_unknown)
    else:
      raise TorchFileError(f"{path}: not a torch file")
    obj = _resolve(obj)
    return (obj, sorted(set(inert))) if inert_unknown else obj
  except TorchFileError:
    raise
  except (pickle.UnpicklingError, EOFError, struct.error, KeyError, zipfile.BadZipFile,
          AttributeError, TypeError, ValueError) as e:
    raise TorchFileError(f"{path}: unreadable torch file ({type(e).__name__}: {e})") from None


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """A flat {name: array} state dict; anything else in the file is an error."""
  obj = load(path)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise TorchFileError(f"{path}: not a state dict of tensors")
  return dict(obj)
