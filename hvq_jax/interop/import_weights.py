"""`hvq import`: initialise our model from PyTorch weights.

Two sources:
  * an `hvq export --format torch` safetensors file (exact inverse of the export);
  * a taming-transformers VQGAN checkpoint (`*.ckpt` read with
    `torch.load(weights_only=True)`, or safetensors). Key mapping, ours <- taming:
      encoder.conv_in                      <- encoder.conv_in
      encoder.down{l}_res{i}.*             <- encoder.down.{l}.block.{i}.*
      encoder.down{l}_attn{i}.*            <- encoder.down.{l}.attn.{i}.*
      encoder.down{l}_downsample.conv      <- encoder.down.{l}.downsample.conv
      decoder.mid_res1 / mid_attn / mid_res2 <- decoder.mid.block_1 / attn_1 / block_2
      decoder.up{l}_res{i}.* / up{l}_attn{i}.* <- decoder.up.{l}.block.{i}.* / attn.{i}.*
      decoder.up{l}_upsample.conv          <- decoder.up.{l}.upsample.conv
      decoder.conv_out                     <- decoder.conv_out
      decoder ... .normN.norm (SpatialNorm's GroupNorm) <- ... .normN (plain GroupNorm)
      codebook.embedding                   <- quantize.embedding.weight
    Tensors whose shapes differ (e.g. a 256-d taming codebook vs our D=4) are not loaded
    and are reported; so are our parameters taming has no counterpart for (the three
    heads, hyperpriors, MoVQ conditioning convs) and taming keys we do not use.
"""
import re
from typing import Dict, List, Tuple

import numpy as np
import jax

from hvq_jax.interop import export


def read_torch_file(path: str) -> Dict[str, np.ndarray]:
  """A .safetensors or torch checkpoint (weights only, no pickle of code) -> numpy."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path)
  import torch
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise export.ExportError(f"{path}: no such file") from None
  except Exception as e:
    raise export.ExportError(f"{path}: cannot read as a weights-only torch checkpoint "
                             f"({type(e).__name__}: {e})") from None
  if isinstance(sd, dict) and "state_dict" in sd:
    sd = sd["state_dict"]
  return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


_RULES = [
    (r"^encoder\.down(\d+)_res(\d+)\.(.*)$", r"encoder.down.\1.block.\2.\3"),
    (r"^encoder\.down(\d+)_attn(\d+)\.(.*)$", r"encoder.down.\1.attn.\2.\3"),
    (r"^encoder\.down(\d+)_downsample\.(.*)$", r"encoder.down.\1.downsample.\2"),
    (r"^encoder\.conv_in\.(.*)$", r"encoder.conv_in.\1"),
    (r"^decoder\.mid_res1\.(.*)$", r"decoder.mid.block_1.\1"),
    (r"^decoder\.mid_attn\.(.*)$", r"decoder.mid.attn_1.\1"),
    (r"^decoder\.mid_res2\.(.*)$", r"decoder.mid.block_2.\1"),
    (r"^decoder\.up(\d+)_res(\d+)\.(.*)$", r"decoder.up.\1.block.\2.\3"),
    (r"^decoder\.up(\d+)_attn(\d+)\.(.*)$", r"decoder.up.\1.attn.\2.\3"),
    (r"^decoder\.up(\d+)_upsample\.(.*)$", r"decoder.up.\1.upsample.\2"),
    (r"^decoder\.conv_out\.(.*)$", r"decoder.conv_out.\1"),
    (r"^decoder\.conv_in\.(.*)$", r"decoder.conv_in.\1"),
    (r"^decoder\.norm_out\.(.*)$", r"decoder.norm_out.\1"),
    (r"^codebook\.embedding$", r"quantize.embedding.weight"),
]


def taming_name(our_key: str):
  """Our torch-layout key -> the taming-transformers key, or None."""
  if our_key.startswith("decoder.") and re.search(r"\.conv_[yb]\.", our_key):
    return None   # MoVQ conditioning convs: no counterpart in a plain VQGAN
  key = re.sub(r"\.(norm\d?|norm)\.norm\.", r".\1.", our_key) if our_key.startswith("decoder.") else our_key
  key = re.sub(r"\.norm_out\.norm\.", ".norm_out.", key)
  for pat, rep in _RULES:
    if re.match(pat, key):
      return re.sub(pat, rep, key)
  return None


def import_taming(params, theirs: Dict[str, np.ndarray]) -> Tuple[dict, dict]:
  """Overwrite our params with taming tensors where names and shapes match.

  Returns (new params, report {loaded, shape_mismatch, not_in_file, unused_in_file}).
  """
  ours = export.flax_to_torch(params)
  loaded, mismatch, absent = [], [], []
  used = set()
  for k, v in ours.items():
    t = taming_name(k)
    if t is None or t not in theirs:
      absent.append(k)
      continue
    used.add(t)
    if tuple(theirs[t].shape) != tuple(v.shape):
      mismatch.append(f"{k} <- {t}: file {tuple(theirs[t].shape)}, model {tuple(v.shape)}")
      continue
    ours[k] = np.asarray(theirs[t], np.float32)
    loaded.append(k)
  report = dict(loaded=loaded, shape_mismatch=mismatch, not_in_file=absent,
                unused_in_file=sorted(set(theirs) - used))
  return export.torch_to_flax(ours), report


def import_hvq(params, tensors: Dict[str, np.ndarray]) -> dict:
  """An hvq_jax torch export -> params (strict: every key, every shape)."""
  new = export.torch_to_flax(tensors)
  export.check_keys(jax.device_get(params), new, "the safetensors file")
  return new


def format_report(report: dict) -> str:
  lines = [f"loaded {len(report['loaded'])} tensors"]
  for key, title in (("shape_mismatch", "not loaded (shape mismatch)"),
                     ("not_in_file", "kept at initialisation (no counterpart in the file)"),
                     ("unused_in_file", "unused keys in the file")):
    items: List[str] = report[key]
    if items:
      lines.append(f"{title}: {len(items)}")
      lines += [f"  {x}" for x in items[:12]] + (["  ..."] if len(items) > 12 else [])
  return "\n".join(lines)
