"""Reading release checkpoints (`torch.save` files, Lightning `*.ckpt`) as tensors only.

Why not `torch.load(weights_only=True)`: a checkpoint saved by the pytorch-lightning of
taming's era keys its callback states by Lightning classes and may hold OmegaConf
hyper-parameters; torch's restricted unpickler refuses them ("Unsupported global"). Its
own remedy, `torch.serialization.safe_globals`, needs those classes importable and then
constructs them, i.e. runs Lightning's and OmegaConf's code on the file's data.

So the file is read by the project's torch-free tensor unpickler (torch_pickle.py) with
every unknown name an inert placeholder (hvq_jax/safe_pickle.py): nothing the file names
is imported or called, the tensors come out, everything else is inert and dropped. No
PyTorch is needed to import a tokenizer.
"""
import os
from typing import Any, Dict, List, Tuple

import numpy as np

from hvq_jax.interop import torch_pickle


class CheckpointError(ValueError):
  """A file that holds no readable state dict; the message names the file and why."""


def load(path: str) -> Tuple[Any, List[str]]:
  """The object a torch checkpoint holds, with unknown objects inert (module docstring),
  and the dotted names that became placeholders."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  try:
    return torch_pickle.load(path, inert_unknown=True)
  except torch_pickle.TorchFileError as e:
    raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).split(': ', 1)[-1]})") from None


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
  obj, inert = load(path)
  sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(sd, dict) or not any(isinstance(v, np.ndarray) for v in sd.values()):
    top = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: no state dict of tensors in this checkpoint (top level: {top})")
  tensors, skipped = {}, []
  for k, v in sd.items():
    if isinstance(v, np.ndarray) and (v.dtype.kind in "fiu" or v.dtype.name == "bfloat16"):
      tensors[str(k)] = v.astype(np.float32)
    else:
      skipped.append(str(k))
  return tensors, dict(format="torch", skipped=skipped, inert=inert,
                       lightning=isinstance(obj, dict) and "pytorch-lightning_version" in obj)
