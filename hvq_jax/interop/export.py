"""Moving a model out of (and into) JAX: PyTorch safetensors, and StableHLO.

PyTorch naming and layouts: a flax param path ('encoder', 'down0_res0', 'conv1',
'kernel') becomes 'encoder.down0_res0.conv1.weight'; conv kernels HWIO -> OIHW, dense
kernels (in, out) -> weight (out, in), GroupNorm scale -> weight; everything else
(codebook, entropy-bottleneck tables, index bias) keeps its name and layout. The mapping
is a bijection, so JAX -> torch -> JAX returns identical params. The file's metadata
holds the model config and the default rate settings (what `hvq compress` uses).

For decoding `.hvq` files the export also stores the integer entropy tables
(entropy/integer.py) as `coding.{branch}.{name}` int64 tensors, with the model fingerprint
and the codec settings in the metadata: a PyTorch decoder reads the very integers the
JAX encoder derived.
"""
import json
from typing import Any, Dict, Tuple

import numpy as np
import jax
import ml_collections

from hvq_jax.configs import upgrade

FORMAT = "hvq_jax-torch-1"


class ExportError(ValueError):
  """A file or key set that does not match the model; the message names the keys."""


def flax_to_torch(params) -> Dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    keys = [p.key for p in path]
    a = np.asarray(leaf, np.float32)
    name = keys[-1]
    if name == "kernel" and a.ndim == 4:
      name, a = "weight", a.transpose(3, 2, 0, 1)
    elif name == "kernel" and a.ndim == 2:
      name, a = "weight", a.T
    elif name == "scale" and a.ndim == 1:
      name = "weight"
    out[".".join(keys[:-1] + [name])] = np.array(a, np.float32, order="C")  # keeps 0-d
  return out


def torch_to_flax(tensors: Dict[str, np.ndarray]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for key, a in tensors.items():
    a = np.asarray(a, np.float32)
    *parents, name = key.split(".")
    if name == "weight" and a.ndim == 4:
      name, a = "kernel", a.transpose(2, 3, 1, 0)
    elif name == "weight" and a.ndim == 2:
      name, a = "kernel", a.T
    elif name == "weight" and a.ndim == 1:
      name = "scale"
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = np.array(a, np.float32, order="C")
  return tree


def check_keys(expected: Dict[str, Any], got: Dict[str, Any], what: str) -> None:
  """Same key set and shapes, or an ExportError listing missing/unexpected/mismatched keys."""
  flat = lambda t: {jax.tree_util.keystr(p): np.shape(v)
                    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  e, g = flat(expected), flat(got)
  missing, unexpected = sorted(set(e) - set(g)), sorted(set(g) - set(e))
  shapes = sorted(k for k in set(e) & set(g) if tuple(e[k]) != tuple(g[k]))
  if missing or unexpected or shapes:
    lines = [f"{what} does not match the model:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    for k in shapes[:10]:
      lines.append(f"  shape mismatch {k}: file {tuple(g[k])}, model {tuple(e[k])}")
    raise ExportError("\n".join(lines))


CODING = "coding."


def save_torch(params, config, path: str, coding=None) -> None:
  """Write the generator as safetensors with PyTorch names/layouts + config metadata.

  `coding`: a `codec.CodecModel` whose integer tables, fingerprint and codec settings
  are stored too (what `torch_model.decompress` needs); `hvq export` always passes it.
  """
  from safetensors.numpy import save_file
  meta = dict(format=FORMAT, model=config.model.to_json(),
              rd=json.dumps(dict(lmbda=float(config.rd.lmbda),
                                 ratios=[float(r) for r in config.granularity.ratios])))
  tensors = flax_to_torch(params)
  if coding is not None:
    from hvq_jax.entropy import integer
    meta.update(fingerprint=coding.fingerprint.hex(), codec=json.dumps(coding.codec),
                integer_version=str(integer.VERSION))
    for key, t in coding.tables.items():
      for name, a in t.arrays().items():
        tensors[f"{CODING}{key}.{name}"] = np.ascontiguousarray(a, np.int64)
  save_file(tensors, path, metadata=meta)


def load_coding(path: str):
  """The integer tables of an export: ({branch: BranchTables}, fingerprint, codec
  settings), or an ExportError saying the file cannot decode."""
  from safetensors import safe_open
  from hvq_jax.entropy import integer
  with safe_open(path, "np") as f:
    meta = f.metadata() or {}
    arrays = {k[len(CODING):]: f.get_tensor(k) for k in f.keys() if k.startswith(CODING)}
  if "fingerprint" not in meta or not arrays:
    raise ExportError(f"{path}: this export has no coding tables (made by an older hvq_jax "
                      "or without a checkpoint); re-export it with `hvq export --format torch`")
  if meta.get("integer_version") != str(integer.VERSION):
    raise ExportError(f"{path}: integer entropy tables of version {meta.get('integer_version')}, "
                      f"this hvq_jax decodes version {integer.VERSION}")
  by_branch = {}
  for k, a in arrays.items():
    branch, name = k.split(".", 1)
    by_branch.setdefault(branch, {})[name] = a
  tables = {b: integer.BranchTables.from_arrays(a) for b, a in by_branch.items()}
  codec = upgrade.upgrade(json.loads(meta["codec"]), "codec").to_dict()
  return tables, bytes.fromhex(meta["fingerprint"]), codec


def load_torch(path: str) -> Tuple[Dict[str, np.ndarray], ml_collections.ConfigDict, dict]:
  """safetensors written by `save_torch` -> (tensors, model config, rate defaults)."""
  from safetensors import safe_open
  try:
    with safe_open(path, "np") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(CODING)}
  except FileNotFoundError:
    raise ExportError(f"{path}: no such file") from None
  except Exception as e:
    raise ExportError(f"{path}: not a safetensors file ({type(e).__name__}: {e})") from None
  if meta.get("format") != FORMAT:
    raise ExportError(f"{path}: not an hvq_jax export (metadata format {meta.get('format')!r}, "
                      f"expected {FORMAT!r})")
  return tensors, upgrade.upgrade(json.loads(meta["model"]), "model"), json.loads(meta["rd"])


# ---- StableHLO --------------------------------------------------------------------------
def export_stablehlo(cmodel, out_dir: str, height: int, width: int) -> Dict[str, str]:
  """Serialise encoder (image -> indices, map, z) and decoder (indices, map -> image) for a
  fixed padded size with `jax.export`, params baked in as constants."""
  import os
  import jax.numpy as jnp
  from hvq_jax.nn import model as model_lib
  from hvq_jax import layout
  from hvq_jax.layout import GRANULARITIES
  m = cmodel.cfg.strides[0]
  if height % m or width % m:
    raise ExportError(f"StableHLO export size {height}x{width} must be a multiple of the "
                      f"coarse stride {m}")
  params = cmodel.params
  mdl = cmodel.model

  def encode(x_uint8, lmbda, ratios):
    x = x_uint8.astype(jnp.float32) / 127.5 - 1.0
    lat = mdl.apply({"params": params}, x, lmbda, ratios, method=model_lib.HVQ.encode_latents)
    return lat["gmap"], tuple(lat["indices"][k] for k in keys)

  def decode(gmap, *idx):   # one index grid per branch, in model.branches order
    idx = dict(zip(keys, idx))
    x = mdl.apply({"params": params}, idx, gmap, (height, width), method=model_lib.HVQ.decode_latents)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

  branches = layout.branches(cmodel.cfg)
  keys = [k for k, _, _ in branches]
  stride = dict(zip(GRANULARITIES, cmodel.cfg.strides))
  grid = lambda g: jax.ShapeDtypeStruct((1, height // stride[g], width // stride[g]), jnp.int32)
  enc = jax.export.export(jax.jit(encode))(
      jax.ShapeDtypeStruct((1, height, width, 3), jnp.uint8),
      jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
  dec = jax.export.export(jax.jit(decode))(grid("coarse"), *[grid(g) for _, g, _ in branches])
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for name, e in (("encoder", enc), ("decoder", dec)):
    p = os.path.join(out_dir, f"{name}_{height}x{width}.stablehlo")
    with open(p, "wb") as f:
      f.write(e.serialize())
    paths[name] = p
  return paths


def load_stablehlo(path: str):
  """A serialised export -> callable (runs without the model code)."""
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call
