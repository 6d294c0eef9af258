"""`hvq import`: our model's params from PyTorch weights someone else trained.

Three sources:
  * an `hvq export --format torch` safetensors file (the exact inverse of the export);
  * a taming-transformers VQGAN (`VQModel`: Encoder, VectorQuantizer2, Decoder; e.g. the
    f16 ImageNet models, K=1024 or 16384, D=256), imported EXACTLY;
  * Control-GIC's checkpoint (lianqi1008/Control-GIC), its encoder and codebook exactly,
    its decoder in part.
Release checkpoints are read as tensors only (torch_checkpoint.py).

Taming -> ours. Taming's VQGAN has one grid, at the stride of its last level: it is our
coarse granularity, so the config sends everything coarse (ratios (1, 0, 0)); the medium
and fine heads are never used and stay at init. Every other tensor has an exact
counterpart:
  encoder.conv_in / down.{l}.block.{i} / down.{l}.attn.{i} / down.{l}.downsample
      -> encoder.conv_in / down{l}_res{i} / down{l}_attn{i} / down{l}_downsample
  encoder.mid.block_1 / attn_1 / block_2, norm_out
      -> encoder.head_coarse.res1 / attn / res2, norm_out (the head IS taming's mid + end)
  quant_conv . encoder.conv_out (two convs, folded: W = Q W_out, b = Q b_out + q)
      -> encoder.head_coarse.conv_out
  quantize.embedding.weight -> codebook.embedding (same L2 argmin)
  decoder.conv_in . post_quant_conv -> decoder.conv_in: our decoder reads the code map
      plus a one-hot of the granularity (D + 3 channels); the entries' columns are
      C_in P, and post_quant_conv's bias rides on the one-hot columns (C_in p, the same
      for all three): exactly one is 1 inside the image and all are 0 in conv_in's zero
      padding, which is where a bias folded into conv_in's own bias would be wrong.
  decoder.mid.* / up.{l}.* / norm_out / conv_out -> decoder.mid_res1, mid_attn, mid_res2 /
      up{l}_res{i}, up{l}_attn{i}, up{l}_upsample / norm_out / conv_out; each of our
      spatial norms GroupNorm(h) * conv_y(c) + conv_b(c) becomes taming's GroupNorm with
      conv_y = (weight 0, bias 1) and conv_b = 0.
Measured against taming's own modules (PyPI taming-transformers, random weights in the
released f16 shapes, whole photos): 100% of taming's indices, decoder output within
2.7e-5 (docs/interop.md; tests/test_taming_import.py).

Control-GIC -> ours (keys: tests/data/control_gic_state_dict_keys.txt). Exact: the
encoder trunk; the three heads (mid_coarse / mid / mid_fine with norm_out_coarse /
norm_out / norm_out_fine and conv_out_coarse / conv_out / conv_out_fine, each with
quant_conv folded in) -> head_coarse / head_medium / head_fine, so every granularity's
indices at every position are Control-GIC's; the codebook; the decoder's upsampling path
(up.*), norm_out and conv_out, whose spatial norms read the code map as ours do (their
conv_y/conv_b get zero columns for our one-hot). Not exact: Control-GIC's decoder starts
with three stems at stride 4 (conv_in_X + mid_X per granularity, pooled to strides 16 and
8 and mixed in by the masks); ours has one stem at the coarse stride. Our stem is
initialised from the coarse one (conv_in_coarse . post_quant_conv, mid_coarse), an
approximation; the medium and fine stems have no counterpart. Its granularity map
(medium/fine decided per 8x8 patch, a 0.01-wide histogram kernel) is not ours (per
16x16 patch) either. So the decoder needs fine-tuning before its pixels mean anything;
the index at each position, which a plug-in prior prices, does not.
"""
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import jax

from hvq_jax.interop import export

Tensors = Dict[str, np.ndarray]
ONEHOT = 3   # our decoder's condition: the code map's D channels + a granularity one-hot


# ---- which model a state dict is ---------------------------------------------------------
def detect(sd: Tensors) -> Optional[str]:
  """'control_gic', 'taming' or None (not a VQGAN state dict we know)."""
  if "encoder.mid_coarse.block_1.conv1.weight" in sd and "decoder.conv_in_coarse.weight" in sd:
    return "control_gic"
  if "encoder.mid.block_1.conv1.weight" in sd and "quant_conv.weight" in sd \
      and "decoder.conv_in.weight" in sd:
    return "taming"
  return None


def _count(sd: Tensors, pattern: str) -> int:
  n = 0
  while pattern.format(n) in sd:
    n += 1
  return n


def architecture(sd: Tensors, source: str) -> dict:
  """The `config.model` fields a taming or Control-GIC state dict implies (by shapes)."""
  need = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight",
          "decoder.conv_out.weight", "decoder.up.0.block.0.conv1.weight",
          "quantize.embedding.weight"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise export.ExportError(f"not a {source} VQGAN state dict: no {', '.join(missing)}")
  if "quantize.used" in sd:
    raise export.ExportError("the quantizer remaps its indices (quantize.used): not supported")
  ch = sd["encoder.conv_in.weight"].shape[0]
  levels = _count(sd, "encoder.down.{}.block.0.conv1.weight")
  if levels < 3:
    raise export.ExportError(f"a {source} VQGAN with {levels} levels: our model needs at least 3 "
                             "(coarse, medium and fine strides)")
  mult = lambda k: int(sd[k].shape[0] // ch)
  k, d = sd["quantize.embedding.weight"].shape
  heads = (("coarse", "mid"), ) if source == "taming" else (
      ("coarse", "mid_coarse"), ("medium", "mid"), ("fine", "mid_fine"))
  strides = tuple(2 ** (levels - 1 - i) for i in range(3))
  head_attn = tuple(s for (g, mid), s in zip(heads, strides)
                    if f"encoder.{mid}.attn_1.q.weight" in sd)
  return dict(
      ch=int(ch), ch_mult=tuple(mult(f"encoder.down.{l}.block.0.conv1.weight") for l in range(levels)),
      num_res_blocks=_count(sd, "encoder.down.0.block.{}.conv1.weight"),
      attn_strides=tuple(2 ** l for l in range(levels) if f"encoder.down.{l}.attn.0.q.weight" in sd),
      head_attn_strides=head_attn,
      dec_ch=int(ch),
      dec_ch_mult=tuple(mult(f"decoder.up.{l}.block.0.conv1.weight") for l in range(levels)),
      dec_num_res_blocks=_count(sd, "decoder.up.0.block.{}.conv1.weight") - 1,
      dec_attn_strides=tuple(2 ** l for l in range(levels) if f"decoder.up.{l}.attn.0.q.weight" in sd),
      norm_groups=32, strides=strides, codebook_size=int(k), embed_dim=int(d),
      shared_codebook=True, l2_normalized=False, lambda_conditioning=False, rvq_stages=1)


def config_mismatches(model_cfg, arch: dict) -> Dict[str, str]:
  """{field: 'model.field: config X, checkpoint Y'} for every field of `arch` the config
  differs in."""
  out = {}
  for k, v in arch.items():
    have = model_cfg.get(k)
    have = tuple(have) if isinstance(have, (list, tuple)) else have
    if have != v:
      out[k] = f"model.{k}: config {have!r}, checkpoint {v!r}"
  return out


CONFIGS = ("taming_f16_1024", "taming_f16_16384", "control_gic")


def fitting_config(arch: dict, source: str) -> Optional[str]:
  """The name of the config in configs/ whose model fits `arch` (None if none does)."""
  import importlib
  for name in CONFIGS:
    if (name == "control_gic") != (source == "control_gic"):
      continue
    cfg = importlib.import_module(f"hvq_jax.configs.{name}").get_config()
    if not config_mismatches(cfg.model, arch):
      return name
  return None


def check_config(config, sd: Tensors, source: str, config_name: str = "the config") -> None:
  """An ExportError naming the fields in which `config` does not fit the checkpoint, and
  the config that would."""
  arch = architecture(sd, source)
  fields = config_mismatches(config.model, arch)
  bad = list(fields.values())
  ratios = tuple(float(r) for r in config.granularity.ratios)
  if source == "taming" and ratios != (1.0, 0.0, 0.0):
    bad.append(f"granularity.ratios: config {ratios}, a single-grid taming VQGAN needs "
               f"(1.0, 0.0, 0.0) (everything sent at the coarse granularity)")
  if not bad:
    return
  fit = fitting_config(arch, source)
  base = "control_gic" if source == "control_gic" else "taming_f16_1024"
  hint = (f"configs/{fit}.py fits it" if fit else
          f"no config in configs/ fits it: copy configs/{base}.py and set "
          + ", ".join(f"model.{k}={arch[k]!r}" for k in fields))
  raise export.ExportError(f"{config_name} does not fit this {source} checkpoint:\n  "
                           + "\n  ".join(bad) + f"\n{hint}")


# ---- renaming and folding -------------------------------------------------------------------
_TRUNK = [(r"encoder\.conv_in\.(.+)", r"encoder.conv_in.\1"),
          (r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", r"encoder.down\1_res\2.\3"),
          (r"encoder\.down\.(\d+)\.attn\.(\d+)\.(.+)", r"encoder.down\1_attn\2.\3"),
          (r"encoder\.down\.(\d+)\.downsample\.(.+)", r"encoder.down\1_downsample.\2"),
          (r"quantize\.embedding\.weight", r"codebook.embedding")]
_UP = [(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", r"decoder.up\1_res\2.\3"),
       (r"decoder\.up\.(\d+)\.attn\.(\d+)\.(.+)", r"decoder.up\1_attn\2.\3"),
       (r"decoder\.up\.(\d+)\.upsample\.(.+)", r"decoder.up\1_upsample.\2"),
       (r"decoder\.norm_out\.(.+)", r"decoder.norm_out.\1"),
       (r"decoder\.conv_out\.(.+)", r"decoder.conv_out.\1")]


def _head(mid: str, norm: str, g: str):
  return [(rf"encoder\.{mid}\.block_1\.(.+)", rf"encoder.head_{g}.res1.\1"),
          (rf"encoder\.{mid}\.attn_1\.(.+)", rf"encoder.head_{g}.attn.\1"),
          (rf"encoder\.{mid}\.block_2\.(.+)", rf"encoder.head_{g}.res2.\1"),
          (rf"encoder\.{norm}\.(.+)", rf"encoder.head_{g}.norm_out.\1")]


def _stem(mid: str):
  return [(rf"decoder\.{mid}\.block_1\.(.+)", r"decoder.mid_res1.\1"),
          (rf"decoder\.{mid}\.attn_1\.(.+)", r"decoder.mid_attn.\1"),
          (rf"decoder\.{mid}\.block_2\.(.+)", r"decoder.mid_res2.\1")]


def _rename(sd: Tensors, rules, used: set) -> Tensors:
  out = {}
  for k in sd:
    for pat, rep in rules:
      m = re.fullmatch(pat, k)
      if m:
        out[m.expand(rep)] = sd[k]
        used.add(k)
        break
  return out


_PLAIN_NORM = re.compile(r"(decoder\.(?:.+\.)?(?:norm|norm1|norm2|norm_out))\.(weight|bias)")


def _spatial_from_groupnorm(dec: Tensors, cond_ch: int) -> Tensors:
  """taming decoder norms (plain GroupNorm) -> our spatial norms that compute exactly that."""
  out = {}
  for k, v in dec.items():
    m = _PLAIN_NORM.fullmatch(k)
    if not m:
      out[k] = v
      continue
    base, what = m.groups()
    out[f"{base}.norm.{what}"] = v
    f = v.shape[0]
    out[f"{base}.conv_y.weight"] = np.zeros((f, cond_ch, 1, 1), np.float32)
    out[f"{base}.conv_y.bias"] = np.ones((f,), np.float32)
    out[f"{base}.conv_b.weight"] = np.zeros((f, cond_ch, 1, 1), np.float32)
    out[f"{base}.conv_b.bias"] = np.zeros((f,), np.float32)
  return out


def _spatial_from_movq(dec: Tensors) -> Tensors:
  """Control-GIC's spatial norms (norm_layer, conv_y/conv_b on the D-channel code map) ->
  ours (norm, conv_y/conv_b on the code map + one-hot: zero columns for the one-hot)."""
  out = {}
  for k, v in dec.items():
    k = k.replace(".norm_layer.", ".norm.")
    if re.search(r"\.conv_[yb]\.weight$", k):
      v = np.concatenate([v, np.zeros(v.shape[:1] + (ONEHOT,) + v.shape[2:], np.float32)], axis=1)
    out[k] = v
  return out


def fold_out(conv_w, conv_b, quant_w, quant_b) -> Tuple[np.ndarray, np.ndarray]:
  """quant_conv (1x1) after a 3x3 conv as one 3x3 conv: W = Q W_out, b = Q b_out + q."""
  q = np.asarray(quant_w, np.float64)[:, :, 0, 0]
  w = np.einsum("dz,zchw->dchw", q, np.asarray(conv_w, np.float64))
  b = q @ np.asarray(conv_b, np.float64) + np.asarray(quant_b, np.float64)
  return w.astype(np.float32), b.astype(np.float32)


def fold_in(conv_w, conv_b, post_w, post_b) -> Tuple[np.ndarray, np.ndarray]:
  """A 3x3 conv after post_quant_conv (1x1) as one 3x3 conv over (code map, one-hot):
  the entries' columns C P; post_quant_conv's bias as the one-hot columns' C p (module
  docstring: exact, zero padding included)."""
  c = np.asarray(conv_w, np.float64)
  w = np.einsum("fzhw,zd->fdhw", c, np.asarray(post_w, np.float64)[:, :, 0, 0])
  bias_cols = np.einsum("fzhw,z->fhw", c, np.asarray(post_b, np.float64))
  w = np.concatenate([w] + [bias_cols[:, None]] * ONEHOT, axis=1)
  return w.astype(np.float32), np.asarray(conv_b, np.float32)


def taming_tensors(sd: Tensors, embed_dim: int) -> Tuple[Tensors, dict]:
  """A taming VQGAN state dict -> our torch-layout tensors (exact) and what was used."""
  used = {"encoder.conv_out.weight", "encoder.conv_out.bias", "quant_conv.weight",
          "quant_conv.bias", "decoder.conv_in.weight", "decoder.conv_in.bias",
          "post_quant_conv.weight", "post_quant_conv.bias"}
  out = _rename(sd, _TRUNK + _head("mid", "norm_out", "coarse"), used)
  dec = _rename(sd, _stem("mid") + _UP, used)
  out.update(_spatial_from_groupnorm(dec, embed_dim + ONEHOT))
  w, b = fold_out(sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"],
                  sd["quant_conv.weight"], sd["quant_conv.bias"])
  out["encoder.head_coarse.conv_out.weight"], out["encoder.head_coarse.conv_out.bias"] = w, b
  w, b = fold_in(sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"],
                 sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
  out["decoder.conv_in.weight"], out["decoder.conv_in.bias"] = w, b
  return out, dict(used=used, approximate=set())


CONTROL_GIC_NO_COUNTERPART = (r"decoder\.conv_in\..+", r"decoder\.mid\..+",
                              r"decoder\.conv_in_fine\..+", r"decoder\.mid_fine\..+")


def control_gic_tensors(sd: Tensors) -> Tuple[Tensors, dict]:
  """A Control-GIC state dict -> our torch-layout tensors and what was used; `approximate`
  lists our keys that are initialised from a counterpart that is not the same function
  (the decoder stem)."""
  used = {"quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight",
          "post_quant_conv.bias", "decoder.conv_in_coarse.weight", "decoder.conv_in_coarse.bias"}
  heads = _head("mid_coarse", "norm_out_coarse", "coarse") + _head("mid", "norm_out", "medium") \
      + _head("mid_fine", "norm_out_fine", "fine")
  out = _rename(sd, _TRUNK + heads, used)
  out.update(_spatial_from_movq(_rename(sd, _UP, used)))
  stem = _spatial_from_movq(_rename(sd, _stem("mid_coarse"), used))
  for g, suffix in (("coarse", "_coarse"), ("medium", ""), ("fine", "_fine")):
    used.update({f"encoder.conv_out{suffix}.weight", f"encoder.conv_out{suffix}.bias"})
    w, b = fold_out(sd[f"encoder.conv_out{suffix}.weight"], sd[f"encoder.conv_out{suffix}.bias"],
                    sd["quant_conv.weight"], sd["quant_conv.bias"])
    out[f"encoder.head_{g}.conv_out.weight"], out[f"encoder.head_{g}.conv_out.bias"] = w, b
  w, b = fold_in(sd["decoder.conv_in_coarse.weight"], sd["decoder.conv_in_coarse.bias"],
                 sd["post_quant_conv.weight"], sd["post_quant_conv.bias"])
  stem["decoder.conv_in.weight"], stem["decoder.conv_in.bias"] = w, b
  out.update(stem)
  return out, dict(used=used, approximate=set(stem))


# ---- into our params ------------------------------------------------------------------------
# Keys of a source state dict that are not part of the tokenizer: training losses
# (discriminator, LPIPS), EMA copies (Control-GIC's inference never uses them), usage counts.
IGNORED = (r"loss\..+", r"ema_.+", r"quantize\.embedding_counter\..+")


def _matches(key: str, patterns: Iterable[str]) -> bool:
  return any(re.fullmatch(p, key) for p in patterns)


def torch_shapes(params) -> Dict[str, tuple]:
  """`export.flax_to_torch`'s keys and shapes without touching values (works on
  `jax.eval_shape` output: no paper-size model is materialised to check a mapping)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    name, shape = keys[-1], tuple(leaf.shape)
    if name == "kernel" and len(shape) == 4:
      name, shape = "weight", (shape[3], shape[2], shape[0], shape[1])
    elif name == "kernel" and len(shape) == 2:
      name, shape = "weight", shape[::-1]
    elif name == "scale" and len(shape) == 1:
      name = "weight"
    out[".".join(keys[:-1] + [name])] = shape
  return out


def source_tensors(sd: Tensors, source: str, embed_dim: int) -> Tuple[Tensors, dict]:
  """(our torch-layout tensors, info) for source 'taming' or 'control_gic'."""
  if source == "taming":
    return taming_tensors(sd, embed_dim)
  if source == "control_gic":
    return control_gic_tensors(sd)
  raise ValueError(f"unknown source {source!r}")


def plan(ours: Dict[str, tuple], sd: Tensors, source: str, mapped: Tensors, info: dict) -> dict:
  """Check a mapping against our params' shapes {torch key: shape} (ExportError naming
  the keys if it does not fit) -> report {exact, approximate, kept_init, no_counterpart,
  ignored}.

  Strict: every tensor of the source's generator lands in a parameter of the same shape,
  and every parameter the source has a counterpart for is filled; what may stay at init
  is the prior (hyper_*, static_*) and, for taming, the medium and fine heads."""
  may_stay = (r"hyper_.+", r"static_.+") + (
      (r"encoder\.head_(medium|fine)\..+",) if source == "taming" else ())
  no_counterpart = CONTROL_GIC_NO_COUNTERPART if source == "control_gic" else ()
  unexpected = sorted(k for k in mapped if k not in ours)
  shapes = sorted(f"{k}: file {tuple(mapped[k].shape)}, model {ours[k]}"
                  for k in mapped if k in ours and tuple(mapped[k].shape) != ours[k])
  unfilled = sorted(k for k in ours if k not in mapped and not _matches(k, may_stay))
  leftover = sorted(k for k in sd if k not in info["used"]
                    and not _matches(k, IGNORED + no_counterpart))
  if unexpected or shapes or unfilled or leftover:
    lines = [f"this {source} checkpoint does not fit the model:"]
    for title, items in (("tensors the model has no place for", unexpected),
                         ("shape mismatch", shapes),
                         ("model parameters the file has nothing for", unfilled),
                         ("file keys that map to nothing", leftover)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8])
                     + (" ..." if len(items) > 8 else ""))
    raise export.ExportError("\n".join(lines))
  return dict(exact=sorted(set(mapped) - info["approximate"]),
              approximate=sorted(info["approximate"]),
              kept_init=sorted(k for k in ours if k not in mapped),
              no_counterpart=sorted(k for k in sd if _matches(k, no_counterpart)),
              ignored=sorted(k for k in sd if _matches(k, IGNORED)))


def import_tokenizer(params, sd: Tensors, source: str, model_cfg) -> Tuple[dict, dict]:
  """Our params with the tokenizer of a taming or Control-GIC state dict (`plan` checks
  it); the rest keep their values. Returns (params, report)."""
  mapped, info = source_tensors(sd, source, int(model_cfg.embed_dim))
  ours = export.flax_to_torch(params)
  report = plan({k: v.shape for k, v in ours.items()}, sd, source, mapped, info)
  for k, v in mapped.items():
    ours[k] = np.asarray(v, np.float32)
  return export.torch_to_flax(ours), report


def import_hvq(params, tensors: Tensors) -> dict:
  """An hvq_jax torch export -> params (strict: every key, every shape)."""
  new = export.torch_to_flax(tensors)
  export.check_keys(jax.device_get(params), new, "the safetensors file")
  return new


def _groups(keys: List[str]) -> str:
  """Keys summarised by module: 'encoder.head_medium (20), hyper_fine (24), ...'."""
  counts: Dict[str, int] = {}
  for k in keys:
    parts = k.split(".")
    g = ".".join(parts[:2] if parts[0] in ("encoder", "decoder") else parts[:1])
    counts[g] = counts.get(g, 0) + 1
  return ", ".join(f"{g} ({n})" for g, n in counts.items())


def format_report(report: dict, sd: Optional[Tensors] = None) -> str:
  size = lambda keys: sum(int(np.prod(sd[k].shape)) for k in keys) if sd else 0
  lines = [f"exact: {len(report['exact'])} tensors"]
  for key, title in (("approximate", "initialised from a counterpart that is not the same function"),
                     ("no_counterpart", "file tensors with no counterpart in our model"),
                     ("kept_init", "kept at initialisation (not part of the source model)"),
                     ("ignored", "ignored (training losses, EMA copies, usage counts)")):
    items = report.get(key) or []
    if items:
      extra = f", {size(items) / 1e6:.2f}M values" if key == "no_counterpart" and sd else ""
      lines.append(f"{title}: {len(items)}{extra}: {_groups(items)}")
  return "\n".join(lines)
