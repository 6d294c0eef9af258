"""Unpickling files from elsewhere without running their code.

A pickle names the functions and classes that rebuild its objects, and the standard
unpickler imports and calls them: a file can run anything. `RestrictedUnpickler` admits
an allow-list of names; every other name is refused, or (`inert_unknown`) stands in as
an `Inert` placeholder class that records what it is given and does nothing else, so
the file's other objects still come out. Framework-free (stdlib only): the LPIPS weights
(numpy arrays) and the torch checkpoint reader (interop/torch_checkpoint.py) share it.
"""
import pickle
from typing import Any, Dict, List, Mapping, Optional, Union


class Inert:
  """What an unknown global of a pickle becomes: constructing, building, appending to or
  setting items on it only records the arguments (`args`, `state`, `items`)."""
  pickle_name = "?"

  def __new__(cls, *args, **kwargs):
    obj = object.__new__(cls)
    obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[])
    return obj

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    self.__dict__["state"] = state

  def __setitem__(self, key, value):
    self.__dict__["items"].append((key, value))

  def append(self, value):
    self.__dict__["items"].append(value)

  def extend(self, values):
    self.__dict__["items"].extend(values)

  def __repr__(self):
    return f"<inert {self.pickle_name}>"


_INERT: Dict[str, type] = {}


def inert_class(name: str) -> type:
  """One placeholder class per dotted name (so classes used as dict keys stay distinct)."""
  if name not in _INERT:
    _INERT[name] = type(f"Inert[{name}]", (Inert,), {"pickle_name": name})
  return _INERT[name]


class RestrictedUnpickler(pickle.Unpickler):
  """`find_class` admits the dotted names in `allowed` only.

  `allowed`: a mapping dotted name -> the object to use (nothing is imported), or a set
  of dotted names resolved by the standard lookup (for names whose import is harmless).
  Any other name raises UnpicklingError, or with `inert_unknown` becomes `inert_class`.
  """
  allowed: Union[Mapping[str, Any], frozenset] = frozenset()
  inert_unknown = False
  what = "only allow-listed types"
  seen_unknown: Optional[List[str]] = None   # a list: the inert names met are appended

  def find_class(self, module, name):
    full = f"{module}.{name}"
    if full in self.allowed:
      if isinstance(self.allowed, Mapping):
        return self.allowed[full]
      return super().find_class(module, name)
    if self.inert_unknown:
      if self.seen_unknown is not None:
        self.seen_unknown.append(full)
      return inert_class(full)
    raise pickle.UnpicklingError(f"refusing to load {full}: {self.what}")
