"""A trained model ready to code: params, config, fingerprint and the integer entropy tables.

Loading needs no trainer and no model init: a local checkpoint's params are read straight
through TensorStore (`checkpoint_direct.read_params`), others restored by Orbax with the shapes
the checkpoint's metadata lists, so compressing an image imports neither optax nor the
discriminator, and decoding one with warm caches (`compile_cache.executable`) not even
flax: the networks are built only when a program has to be traced.
"""
import functools
import hashlib
import json
from typing import Dict, Optional

import numpy as np
import jax
import jax.numpy as jnp
from hvq_jax import checkpoint as ckpt_lib
from hvq_jax import checkpoint_direct as ckpt_direct
from hvq_jax import compile_cache
from hvq_jax import layout
from hvq_jax.configs import upgrade
from hvq_jax.entropy import integer

class CheckpointError(FileNotFoundError):
  """No usable checkpoint where one was asked for; the message names the directory."""


# Compute settings: they change how fast (and, by float rounding, which pixels) a model
# computes, never its params, symbols or integer tables, so they are not fingerprinted.
_COMPUTE_ONLY = ("dtype", "remat", "rate_chunk", "attn_chunk")
# Fields added since the first files, at the value every earlier model had: left out of
# the fingerprint at that value, so those models' files still decode. Keys are paths.
_AS_BEFORE = {("dec_mid_attn",): True, ("hyperprior", "spatial"): "none"}


def _drop_at(cfg: dict, path: tuple, value) -> dict:
  """cfg without the field at path when it holds value (or is absent)."""
  head, rest = path[0], path[1:]
  if head not in cfg:
    return cfg
  if not rest:
    return cfg if cfg[head] != value else {k: v for k, v in cfg.items() if k != head}
  return {**cfg, head: _drop_at(cfg[head], rest, value)} if isinstance(cfg[head], dict) else cfg


def fingerprint(params, model_cfg, codec: Optional[dict] = None) -> bytes:
  """8 bytes of sha256 over the params (in tree order), the model config (less compute
  settings) and what of the codec settings the integer tables depend on."""
  cfg = {k: v for k, v in json.loads(model_cfg.to_json()).items() if k not in _COMPUTE_ONLY}
  for path, value in _AS_BEFORE.items():
    cfg = _drop_at(cfg, path, value)
  h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
  if codec is not None:
    h.update(json.dumps(dict(integer=integer.VERSION, z_range=int(codec["z_range"]),
                             weight_bits=int(codec["weight_bits"])), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.digest()[:8]


def codebook_entries(params, model_cfg, key: str, stage: int) -> np.ndarray:
  """Branch `key`'s codebook as the model uses it, in deterministic float64 (the l2
  normalisation of nn/codebook.py with a fixed summation order)."""
  e = np.asarray(params[layout.codebook_name(model_cfg, key, stage)]["embedding"], np.float64)
  if model_cfg.l2_normalized and stage == 0:
    sq = e[:, 0] * e[:, 0]
    for d in range(1, e.shape[1]):
      sq = sq + e[:, d] * e[:, d]
    e = e / np.sqrt(sq + 1e-6)[:, None]
  return e


def build_tables(params, model_cfg, codec: dict) -> Dict[str, integer.BranchTables]:
  """The integer entropy model of every branch (deterministic: see entropy/integer.py)."""
  host = jax.device_get(params)
  hyper_on = bool(model_cfg.hyperprior.enabled)
  out = {}
  entries = {k: codebook_entries(host, model_cfg, k, s) for k, _, s in layout.branches(model_cfg)}
  ctx_bits = integer.context_bits(entries.values())   # one scale for every branch's context
  for k, _, s in layout.branches(model_cfg):
    sub = host[f"hyper_{k}" if hyper_on else f"static_{k}"]
    out[k] = integer.build_branch(sub, entries[k], hyper_on, model_cfg, codec, ctx_bits)
  return out


class CodecModel:
  """Params, config, fingerprint and integer tables of one model, on one device.

  `model` (the flax module) is built on first use; `CodecModel(config, params)` builds it
  at once, which checks the config (`nn.model.validate`). `load_model` skips that: a
  checkpoint's config was checked when its run built the model, and a codec command whose
  programs are all in the executable cache never needs the module.
  """

  def __init__(self, config, params, _build_model: bool = True):
    self.config = config
    self.cfg = config.model
    self._model = None
    if _build_model:
      self._model = self.model
    self.params = params
    self.codec = codec = config.codec.to_dict()
    self.hyper_on = bool(self.cfg.hyperprior.enabled)
    self.branches = layout.branches(self.cfg)
    host = jax.device_get(params)
    leaves = jax.tree.leaves(host)
    if not all(np.isfinite(np.asarray(a)).all() for a in leaves):
      raise CheckpointError("the checkpoint's params hold NaN or Inf (a diverged run?): "
                            "this model cannot code; restore an earlier step")
    self.fingerprint = fingerprint(host, config.model, codec)
    self.tables = build_tables(host, self.cfg, codec)
    self._device_tables = {k: _device_tables(t) for k, t in self.tables.items()} if self.hyper_on else {}
    self.default_lmbda = float(config.rd.lmbda)
    self.default_ratios = tuple(float(v) for v in config.granularity.ratios)

  @property
  def model(self):
    """The flax module (`nn.model.HVQ`), built on first use."""
    if self._model is None:
      from hvq_jax.nn import model as model_lib
      self._model = model_lib.build(self.cfg)
    return self._model

  @functools.cached_property
  def program_key(self) -> str:
    """What the compiled networks depend on besides argument shapes: the model config
    (compute settings included)."""
    return json.dumps(json.loads(self.cfg.to_json()), sort_keys=True)

  def index_weights(self, key: str, mu: np.ndarray, ls: np.ndarray) -> np.ndarray:
    """Integer index weights [n, K] as float32, built on the default device in fixed-size
    chunks (one compiled program for every image size); bitwise equal to the numpy
    `integer.index_weights`."""
    t = self._device_tables[key]
    chunk = int(self.codec["index_chunk"])
    n = len(mu)
    out = np.empty((n, self.tables[key].codebook.shape[0]), np.float32)
    pad = -n % chunk
    mu = np.pad(np.asarray(mu, np.int32), ((0, pad), (0, 0)))
    ls = np.pad(np.asarray(ls, np.int32), ((0, pad), (0, 0)), constant_values=self.tables[key].ls_lo)
    run = None
    parts = []
    for s in range(0, n + pad, chunk):
      args = (jax.device_put(mu[s:s + chunk]), jax.device_put(ls[s:s + chunk]), *t["arrays"],
              t["ls_lo"], t["total_hyper"])
      if run is None:
        run = compile_cache.executable("index_weights", lambda: _index_weights_fn, args)
      parts.append(run(*args))
    for i, p in enumerate(parts):
      s = i * chunk
      out[s:min(s + chunk, n)] = np.asarray(p)[:min(chunk, n - s)]
    return out


def _device_tables(t: integer.BranchTables):
  # jax.device_put, not jnp.asarray: the same int32 arrays without compiling a copy
  # program per shape in every process.
  arrays = tuple(jax.device_put(np.asarray(a, np.int32)) for a in (
      t.codebook, t.inv_mant, t.inv_shift, t.bias, t.static, integer.EXP_TABLE))
  return dict(arrays=arrays, ls_lo=jax.device_put(np.int32(t.ls_lo)),
              total_hyper=jax.device_put(np.int32(t.total_hyper)))


def _index_weights_fn(mu, ls, codebook, inv_mant, inv_shift, bias, static, exp_table, ls_lo,
                      total_hyper):
  w = integer.index_weights(mu, ls, codebook, inv_mant, inv_shift, bias, static, exp_table,
                            ls_lo, total_hyper, xp=jnp)
  return w.astype(jnp.float32)   # exact: every weight is below 2^24



def load_params(ckpt_dir: str, step: Optional[int] = None):
  """(config, params) of a training workdir or its `checkpoints/` folder (local or a URL
  such as gs://...): EMA params when the run kept them, onto one device. Restores the
  params subtree only, with the shapes and dtypes stored in the checkpoint: a local one
  through TensorStore without Orbax (`checkpoint_direct.read_params`), otherwise through Orbax
  with the structure the checkpoint's metadata lists. Both verify the params and the
  config against the step's checksums; a damaged step raises CheckpointCorrupt in one
  line naming it and the steps to choose from instead (it never falls back by itself: a
  codec must not code with a model other than the one asked for)."""
  d = ckpt_lib.find_checkpoints(ckpt_dir)
  if d is None:
    raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
  if step is not None and not _has_step(d, step):
    raise CheckpointError(f"{ckpt_dir}: no checkpoint step {step} (steps: {_steps_text(d)})")
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    found = ckpt_direct.local_step_config(d, step)
    if found is not None:
      config = upgrade.upgrade(found[1])
      params = ckpt_direct.read_params(d, found[0], _params_key(config))
      if params is not None:
        return config, jax.device_put(params, one)
    return _restore_with_orbax(ckpt_dir, d, step, one)
  except ckpt_lib.CheckpointCorrupt as e:
    raise ckpt_lib.CheckpointCorrupt(
        f"{e}; the step is damaged: choose another with --step N (steps: {_steps_text(d)})"
    ) from None


def _step_names(d: str):
  """Finalised step numbers in a checkpoints folder, newest first (no Orbax)."""
  try:
    if ckpt_lib.is_url(d):
      from etils import epath
      names = [p.name for p in epath.Path(d).iterdir()]
    else:
      import os
      names = os.listdir(d)
  except OSError:
    return []
  return sorted((int(n) for n in names if n.isdigit()), reverse=True)


def _has_step(d: str, step: int) -> bool:
  return int(step) in _step_names(d)


def _steps_text(d: str) -> str:
  steps = _step_names(d)
  return ", ".join(map(str, steps)) if steps else "none"


def _params_key(config) -> str:
  return "ema_params" if config.train.ema_decay > 0 else "params"


def _restore_with_orbax(ckpt_dir: str, d: str, step: Optional[int], one, from_init: bool = False):
  """`load_params` through Orbax's CheckpointManager; `from_init`: the shapes from
  `jax.eval_shape` of the model's init: the fallback for a checkpoint whose metadata does
  not list the params as a tree of arrays, and the reference the tests compare with)."""
  ck = ckpt_lib.Checkpointer(d, async_save=False, read_only=True)
  try:
    if ck.latest_step() is None:
      raise CheckpointError(f"{ckpt_dir}: no checkpoint found (train with `hvq train` first)")
    shown = ck.latest_step() if step is None else step
    config = upgrade.upgrade(_read(d, shown, lambda: ck.restore_config(step)))
    key = _params_key(config)
    params = None if from_init else _read(d, shown, lambda: ck.restore_subtree(step, key, one))
    if params is None:
      from hvq_jax.nn import model as model_lib
      model = model_lib.build(config.model)
      abstract = jax.eval_shape(functools.partial(model_lib.init_params, model,
                                                  image_size=int(config.image_size)),
                                jax.random.PRNGKey(0))
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                              abstract)
      params = _read(d, shown, lambda: ck.restore_params(step, {key: abstract}))[key]
  finally:
    ck.close()
  return config, params


def _read(d: str, step, read):
  """`read()` (an Orbax read of step `step`), any failure of it as CheckpointCorrupt."""
  try:
    return read()
  except ckpt_lib.CheckpointCorrupt:
    raise
  except Exception as e:   # noqa: BLE001 (Orbax / TensorStore: the step cannot be read)
    raise ckpt_lib.CheckpointCorrupt(f"{ckpt_lib.where(d, step)}: cannot be read "
                                     f"({ckpt_lib.integrity.describe_error(e)})") from None


def load_model(ckpt_dir: str, step: Optional[int] = None) -> CodecModel:
  """A CodecModel from a training workdir or its `checkpoints/` folder (`load_params`)."""
  return CodecModel(*load_params(ckpt_dir, step), _build_model=False)
