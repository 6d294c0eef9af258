"""Bring a stored config (a checkpoint's, an export's) up to date, once, where it is loaded.

Every field has one default, in `default.py`; code reads fields by attribute. A config
written by an older version lacks the fields added since: each such field gets the value
that reproduces what that older version computed (`LEGACY`: e.g. a checkpoint made before
`index_bias` existed has no bias), every other missing field the current default.
"""
from typing import Any, Dict

import ml_collections

from hvq_jax.configs import default

# Fields added after the first checkpoints were written, with the behaviour those
# checkpoints have (where it differs from today's default).
LEGACY: Dict[str, Any] = {
    "model.hyperprior.mask_z": False,
    "model.hyperprior.index_bias": False,
    "model.hyperprior.index_bias_scale": 1.0,
    "model.hyperprior.index_mixture": False,
    "model.hyperprior.context": "none",
    "model.rvq_stages": 1,
    "model.rvq_init_scale": 0.0,
    "train.recipe": "joint",
}


# Limits an older version stored as its default, where the limit was that version's
# code's and not the model's: a stored value equal to one of these becomes today's
# default (4096^2 pixels: the quadratic attention that set it is gone).
RENEWED: Dict[str, tuple] = {
    "codec.max_pixels": (4096 * 4096,),
}


def _fill(stored: dict, defaults: dict, prefix: str) -> dict:
  out = dict(stored)
  for k, v in defaults.items():
    path = prefix + k
    if isinstance(v, dict):
      out[k] = _fill(stored.get(k) or {}, v, path + ".")
    elif k not in stored:
      out[k] = LEGACY.get(path, v)
    elif stored[k] in RENEWED.get(path, ()):
      out[k] = v
  return out


def upgrade(stored: dict, part: str = "") -> ml_collections.ConfigDict:
  """A stored config (a dict, as saved) -> ConfigDict with every current field. `part`
  names a section stored on its own ("model", "codec"): then `stored` is that section."""
  defaults = default.get_config().to_dict()
  for k in part.split(".") if part else ():
    defaults = defaults[k]
  return ml_collections.ConfigDict(_fill(stored, defaults, part + "." if part else ""))
