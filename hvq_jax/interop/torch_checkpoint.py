"""Reading release checkpoints (`torch.save` files, Lightning `*.ckpt`) as tensors only.

Why not `torch.load(weights_only=True)` alone: a checkpoint saved by the pytorch-lightning
of taming's era keys its callback states by Lightning classes and may hold OmegaConf
hyper-parameters; torch's restricted unpickler refuses them ("Unsupported global"). Its
own remedy, `torch.serialization.safe_globals`, needs those classes importable and then
constructs them, i.e. runs Lightning's and OmegaConf's code on the file's data; and an
inert stand-in registered under their names still fails where the file fills it with
SETITEMS/APPENDS (torch's unpickler builds only dicts and lists that way).

So torch reads the zip (storages, tensor records) with a pickle module of ours: its
`find_class` admits exactly what `weights_only` admits by default, minus the rebuilders
of sparse, nested, quantized and wrapper tensors (torch validates those after its own
unpickling, which this path would skip), and turns every other name into an inert
placeholder (hvq_jax/safe_pickle.py). Nothing the file names is imported or called; the
tensors come out, everything else is inert and dropped.
"""
import functools
import os
import types
from typing import Any, Dict, List, Tuple

import numpy as np

from hvq_jax import safe_pickle


class CheckpointError(ValueError):
  """A file that holds no readable state dict; the message names the file and why."""


_SKIPPED_REBUILDS = ("_rebuild_sparse_tensor", "_rebuild_nested_tensor", "_rebuild_qtensor",
                     "_rebuild_wrapper_subclass", "_rebuild_meta_tensor_no_storage",
                     "_rebuild_device_tensor_from_numpy")


@functools.lru_cache(maxsize=1)
def _allowed() -> Dict[str, Any]:
  import torch
  from torch import _weights_only_unpickler as wo
  allowed = {k: v for k, v in wo._get_allowed_globals().items()
             if isinstance(k, str) and k.rsplit(".", 1)[-1] not in _SKIPPED_REBUILDS
             and not k.startswith("torch.sparse") and ".sparse." not in k}
  allowed["torch._tensor._rebuild_from_type_v2"] = _rebuild_from_type_v2
  return allowed


def _rebuild_from_type_v2(func, new_type, args, state):
  """torch's subclass rebuilder for plain tensors and Parameters only (a placeholder
  `new_type` would otherwise get the tensor's attributes set on a foreign class)."""
  import torch
  if new_type not in (torch.Tensor, torch.nn.Parameter) or func not in _allowed().values():
    return safe_pickle.inert_class("torch._tensor._rebuild_from_type_v2")(func, new_type, args)
  return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def pickle_module() -> types.ModuleType:
  """A module with the `Unpickler` and `load` that torch.load uses for the file's pickles;
  `seen_unknown` lists the names that became placeholders."""
  class Unpickler(safe_pickle.RestrictedUnpickler):
    allowed = _allowed()
    inert_unknown = True
    seen_unknown = []

  def load(f, **kwargs):
    return Unpickler(f, **kwargs).load()

  mod = types.ModuleType("hvq_jax_restricted_pickle")
  mod.Unpickler, mod.load, mod.seen_unknown = Unpickler, load, Unpickler.seen_unknown
  return mod


def load(path: str) -> Tuple[Any, List[str]]:
  """The object a torch checkpoint holds, with unknown objects inert (module docstring),
  and the dotted names that became placeholders."""
  import torch
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    # weights_only=False only hands unpickling to `pickle_module()`, which is what
    # restricts it; torch's own restricted unpickler cannot take a pickle module.
    mod = pickle_module()
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=mod)
    return obj, sorted(set(mod.seen_unknown))
  except Exception as e:   # torch raises RuntimeError, pickle errors, zipfile errors...
    raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def state_dict(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """A .safetensors file, or a torch checkpoint's `state_dict` (or a bare dict of tensors),
  -> ({key: float32 numpy}, info {format, skipped: non-tensor entries, inert: names
  the file referred to that were never loaded})."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return ({k: np.asarray(v, np.float32) for k, v in load_file(path).items()},
              dict(format="safetensors", skipped=[], inert=[]))
    except FileNotFoundError:
      raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
      raise CheckpointError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
  import torch
  obj, inert = load(path)
  sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
    top = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no state dict of tensors in this checkpoint (top level: {top})")
  tensors, skipped = {}, []
  for k, v in sd.items():
    if isinstance(v, torch.Tensor) and not v.is_sparse and v.layout == torch.strided:
      tensors[str(k)] = v.detach().to(torch.float32).numpy()
    else:
      skipped.append(str(k))
  return tensors, dict(format="torch", skipped=skipped, inert=inert,
                       lightning=isinstance(obj, dict) and "pytorch-lightning_version" in obj)
