"""Where every symbol lives: granularities, branches, grids, masks and the stream order.

Framework-free: the flax model (jax.numpy, traced), the codec (numpy) and the PyTorch
decoder (numpy) all use these definitions, so encoder and decoders cannot disagree on a
grid, a mask or the order of streams. Array functions take the namespace `xp` (numpy or
jax.numpy).
"""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

GRANULARITIES = ("coarse", "medium", "fine")


def branches(model_cfg) -> Tuple[Tuple[str, str, int], ...]:
  """(key, granularity, stage) of every index stream, in bitstream order: stage 0 is
  keyed by the granularity's name, residual stage s >= 1 by f"{g}_s{s}"."""
  n = int(model_cfg.rvq_stages)
  return tuple((g if s == 0 else f"{g}_s{s}", g, s) for g in GRANULARITIES for s in range(n))


def codebook_name(model_cfg, key: str, stage: int) -> str:
  """The params entry holding branch `key`'s codebook: shared across granularities (one
  per stage), or one per branch."""
  if model_cfg.shared_codebook:
    return "codebook" if stage == 0 else f"codebook_s{stage}"
  return f"codebook_{key}"


def padded_size(h: int, w: int, coarse_stride: int) -> Tuple[int, int]:
  """Images are edge-padded on the bottom/right to multiples of the coarse stride."""
  return -(-h // coarse_stride) * coarse_stride, -(-w // coarse_stride) * coarse_stride


def grids(hp: int, wp: int, strides) -> Dict[str, Tuple[int, int]]:
  """Index grid (h_g, w_g) of each granularity for a padded image hp x wp."""
  return {g: (hp // s, wp // s) for g, s in zip(GRANULARITIES, strides)}


def z_grid(h: int, w: int, num_down: int) -> Tuple[int, int]:
  """The hyper-latent grid over an index grid h x w (`num_down` stride-2 'SAME' convs)."""
  for _ in range(num_down):
    h, w = -(-h // 2), -(-w // 2)
  return h, w


def sent_masks(gmap, strides, xp=np) -> Dict[str, object]:
  """Coarse-grid map [B, hc, wc] -> {g: bool [B, h_g, w_g]} positions sent at granularity g."""
  b, h, w = gmap.shape
  out = {}
  for gi, (g, s) in enumerate(zip(GRANULARITIES, strides)):
    f = strides[0] // s
    m = gmap == gi
    out[g] = xp.broadcast_to(m[:, :, None, :, None], (b, h, f, w, f)).reshape(b, h * f, w * f)
  return out


def z_masks(masks: Dict[str, object], num_down: int, xp=np) -> Dict[str, object]:
  """Sent-position masks {g: [B, h, w]} -> z positions sent {g: [B, h_z, w_z]}: those
  whose 2^n x 2^n block holds a sent position (config `hyperprior.mask_z`)."""
  f = 2 ** num_down
  out = {}
  for g, m in masks.items():
    b, h, w = m.shape
    m = xp.pad(m, ((0, 0), (0, (-h) % f), (0, (-w) % f)))
    out[g] = m.reshape(b, m.shape[1] // f, f, m.shape[2] // f, f).any(axis=(2, 4))
  return out


def prior_context(g: str, masks: Dict[str, object], entries: Dict[str, object], strides,
                  dim: int, one, xp=np):
  """What granularity g's prior reads with hyperprior.context='coarser', on g's grid: for
  each granularity decoded before it (coarser), its entries where sent and its mask
  (= `one`), repeated onto g's grid; g's own mask; zeros for the finer ones.

  masks {g: bool [..., h_g, w_g]}; entries {o: [..., h_o, w_o, D]} for the coarser o (the
  entry of each position's index; any value where not sent) -> [..., h_g, w_g, 3 (D + 1)]
  in entries' units. The float model (jnp, one=1.0), the codec (numpy int64 fixed point,
  entropy/integer.py) and the PyTorch model call this one definition."""
  st = dict(zip(GRANULARITIES, strides))
  gi = GRANULARITIES.index(g)
  parts = []
  for j, o in enumerate(GRANULARITIES):
    if j < gi:
      f = st[o] // st[g]
      up = lambda a: xp.repeat(xp.repeat(a, f, axis=-3), f, axis=-2)
      parts += [up(entries[o] * masks[o][..., None]), up(masks[o][..., None] * one)]
    elif j == gi:
      m = masks[o][..., None] * one
      parts += [xp.zeros(m.shape[:-1] + (dim,), m.dtype), m]
    else:   # finer: not decoded yet (their masks need not be given)
      parts.append(xp.zeros(parts[-1].shape[:-1] + (dim + 1,), parts[-1].dtype))
  return xp.concatenate(parts, axis=-1)


# hyperprior.spatial: how many passes each granularity's indices are coded in
SPATIAL_PASSES = {"none": 1, "checkerboard": 2, "quad": 4}


def num_passes(model_cfg) -> int:
  """Passes per granularity of a model's index streams (1 without a spatial context)."""
  return SPATIAL_PASSES[model_cfg.hyperprior.spatial]


def pass_map(h: int, w: int, passes: int, xp=np):
  """The pass of every position of an h x w index grid, int32 [h, w]: one pass; a
  checkerboard ((y + x) even first: every second-pass position has its four direct
  neighbours decoded); or a 2x2 interleave in the order (0, 0), (1, 1), (0, 1), (1, 0)
  (the second pass sees its four diagonal neighbours, the third its four direct ones,
  the last all eight)."""
  y = xp.arange(h, dtype=xp.int32)[:, None] % 2
  x = xp.arange(w, dtype=xp.int32)[None, :] % 2
  if passes == 1:
    return xp.zeros((h, w), xp.int32)
  if passes == 2:
    return (y + x) % 2
  if passes == 4:   # (0,0) -> 0, (1,1) -> 1, (0,1) -> 2, (1,0) -> 3
    return xp.where(y == x, y, 2 + y)
  raise ValueError(f"no pass pattern with {passes} passes")


def spatial_context(entries, mask, passes, p: int, one, xp=np):
  """What pass p of a granularity's prior reads with hyperprior.spatial: the entries of
  that granularity's positions sent in earlier passes and their mask (= `one`), zeros
  elsewhere. entries [..., h, w, D] (the entry of each position's index; any value where
  not sent), mask bool [..., h, w], passes int [h, w] (`pass_map`) -> [..., h, w, D + 1]
  in entries' units. The float model (jnp, one=1.0), the codec (numpy int64 fixed point,
  entropy/integer.py) and the PyTorch model call this one definition."""
  known = mask & (passes < p)
  return xp.concatenate([entries * known[..., None], known[..., None] * one], axis=-1)


class Stream(NamedTuple):
  kind: str          # "map" | "z" | "y"
  branch: str        # branch key ("" for the map)
  granularity: str   # "" for the map
  part: int = 0      # y: the spatial pass (layout.pass_map) whose positions it holds


def stream_plan(model_cfg, counts: Sequence[int]) -> List[Stream]:
  """The payload's streams in order: the granularity map; z of every branch whose
  granularity has sent positions (hyperprior models); then those branches' indices, each
  branch pass by pass (hyperprior.spatial; one pass without)."""
  sent = {g: int(c) > 0 for g, c in zip(GRANULARITIES, counts)}
  plan = [Stream("map", "", "")]
  live = [(k, g) for k, g, _ in branches(model_cfg) if sent[g]]
  if model_cfg.hyperprior.enabled:
    plan += [Stream("z", k, g) for k, g in live]
  n = num_passes(model_cfg) if model_cfg.hyperprior.enabled else 1
  plan += [Stream("y", k, g, p) for k, g in live for p in range(n)]
  return plan


def payload_version(model_cfg) -> int:
  """The .hvq format version whose payload a model's files carry (entropy/bitstream.py): 3
  when its index streams come in spatial passes, else 2 (the files of models without a
  spatial context are what format 2 always was). It writes format 4 (that payload and the
  colour transform) and reads this version and 4."""
  return 3 if model_cfg.hyperprior.enabled and num_passes(model_cfg) > 1 else 2


def ratios_error(ratios):
  """Why (coarse, medium, fine) ratios are invalid, or None: the one rule, framework-free."""
  r = [float(v) for v in ratios]
  if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1.0) > 1e-6:
    return (f"granularity ratios (coarse, medium, fine) must be 3 non-negative numbers "
            f"summing to 1, got {tuple(ratios)}")
  return None
