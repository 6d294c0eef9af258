"""`hvq train`: generator + PatchGAN discriminator training with rate control.

One jitted step updates both networks (VQGAN recipe): the generator minimises
  mean(lambda_i * bpp_i) + w_rec * rec + w_lpips * LPIPS + a * w_gan * hinge_G + VQ,
the discriminator the hinge loss, both switched on for the GAN only after disc_start.
Lambda is sampled per example from config.rd.lambdas and fed to the networks.
"""
import collections
import functools
import io
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

import numpy as np
import jax
import jax.numpy as jnp
import optax
import ml_collections
from etils import epath

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax.nn import codebook as codebook_lib
from hvq_jax.training import data as data_lib
from hvq_jax import images as images_lib
from hvq_jax.training import losses
from hvq_jax.nn import lpips as lpips_lib
from hvq_jax.evaluation import metrics as metrics_lib
from hvq_jax.nn import model as model_lib
from hvq_jax.training import sharding
from hvq_jax.training.discriminator import PatchGAN
from hvq_jax.layout import GRANULARITIES


def validate_config(config) -> None:
  model_lib.validate(config.model)
  model_lib.check_ratios(config.granularity.ratios)
  def err(msg):
    raise model_lib.ConfigError(msg)
  if config.image_size % config.model.strides[0]:
    err(f"config.image_size={config.image_size} must be a multiple of the coarse stride "
        f"{config.model.strides[0]}")
  if config.train.batch_size < 1:
    err(f"config.train.batch_size must be >= 1, got {config.train.batch_size}")
  if config.train.num_steps < 0:
    err(f"config.train.num_steps must be >= 0, got {config.train.num_steps}")
  if not config.rd.lambdas or min(config.rd.lambdas) <= 0:
    err(f"config.rd.lambdas must be positive, got {config.rd.lambdas}")
  if config.loss.w_gan > 0 and config.disc.ch * 2 % min(32, config.disc.ch) != 0:
    err("config.disc.ch must be a multiple of 32 or below 32")
  if config.eval.enabled and config.eval.image_size < 161:   # metrics.MS_SSIM_MIN_SIZE
    err(f"config.eval.image_size={config.eval.image_size}: the held-out report's MS-SSIM "
        f"needs at least 161 px (or set --config.eval.enabled=False)")
  trainable = config.train.get("trainable", "all")
  if trainable not in ("all", "prior"):
    err(f"config.train.trainable must be 'all' or 'prior', got {trainable!r}")
  if trainable == "prior" and not config.train.get("init_from", ""):
    err("config.train.trainable='prior' trains a prior for a frozen tokenizer: set "
        "config.train.init_from to the run whose encoder, codebooks and decoder it freezes")


PRIOR_PREFIXES = ("hyper_", "static_")   # the index prior's params (nn/model.py names)


def is_prior(path) -> bool:
  """Is this params path part of the index prior (a hyperprior branch or static histogram)?"""
  return str(getattr(path[0], "key", path[0])).startswith(PRIOR_PREFIXES)


def init_from(params, source: str):
  """Params of the run at `source` (workdir or checkpoints folder) copied into `params`
  wherever name and shape match; the rest keep their init. Returns (params, report)."""
  from hvq_jax import codec
  _, theirs = codec.load_params(source)
  theirs = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      jax.device_get(theirs))[0]}
  report = dict(loaded=[], kept_init=[], shape_mismatch=[])
  def pick(path, leaf):
    k = jax.tree_util.keystr(path)
    if k not in theirs:
      report["kept_init"].append(k)
      return leaf
    if np.shape(theirs[k]) != np.shape(leaf):
      report["shape_mismatch"].append(k)
      return leaf
    report["loaded"].append(k)
    return np.asarray(theirs[k], np.asarray(leaf).dtype)
  new = jax.tree_util.tree_map_with_path(pick, jax.device_get(params))
  report["unused"] = sorted(set(theirs) - set(report["loaded"]) - set(report["shape_mismatch"]))
  return new, report


def make_optimizer(tc, lr: float, frozen=None) -> optax.GradientTransformation:
  """Adam with warmup-cosine, clipping and the finite-update guard. `frozen(path)` -> bool
  marks params that never move (a plug-in prior's tokenizer): optax.set_to_zero gives
  them no update and no Adam moments, and the clip norm counts only the trained ones."""
  sched = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(tc.warmup_steps, 1), max(tc.num_steps, tc.warmup_steps + 1), lr * tc.final_lr_frac)
  opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                    optax.adam(sched, b1=tc.b1, b2=tc.b2))
  if frozen is not None:
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if frozen(p) else "trained", params)
    opt = optax.multi_transform({"trained": opt, "frozen": optax.set_to_zero()}, labels)
  # A non-finite update is dropped (params and moments unchanged) and counted, however
  # many come in a row: optax would apply the NaN update after `max_consecutive_errors`,
  # so that limit is never reached here; train_and_evaluate stops the run instead after
  # train.max_bad_steps consecutive bad steps.
  return optax.apply_if_finite(opt, max_consecutive_errors=2 ** 30)


def guarded_update(opt, grads, opt_state, params):
  """One optimiser step that is dropped whole when the gradients or the resulting update
  are non-finite. optax.apply_if_finite looks at the gradients only: a NaN made inside
  the optimiser (its moments) would reach the params. Keeps apply_if_finite's state,
  counting a dropped update in `notfinite_count` as it does."""
  updates, new_state = opt.update(grads, opt_state, params)
  # (one reduction: a per-leaf isfinite made XLA's compile take 6x the memory)
  ok = jnp.isfinite(optax.global_norm(updates))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_params = keep(optax.apply_updates(params, updates), params)
  dropped = (new_state.notfinite_count > 0) | ~ok
  new_state = keep(new_state, opt_state)._replace(
      notfinite_count=jnp.where(dropped, opt_state.notfinite_count + 1, 0),
      total_notfinite=opt_state.total_notfinite + dropped.astype(jnp.int32))
  return new_params, new_state


class Trainer:
  """Builds the model, optimisers, the mesh and the jitted, sharded step for a config.

  `devices` (default: all) is what the mesh is built on; the codec passes one device.
  """

  def __init__(self, config, devices=None):
    validate_config(config)
    self.config = config
    self.model = model_lib.build(config.model)
    self.disc = PatchGAN(config.disc.ch, config.disc.n_layers, min(32, config.disc.ch))
    plug_in = config.train.get("trainable", "all") == "prior"
    self.opt_g = make_optimizer(config.train, config.train.lr,
                                (lambda p: not is_prior(p)) if plug_in else None)
    self.opt_d = make_optimizer(config.train, config.train.disc_lr)
    self.lpips = None
    self.lpips_params = None
    if config.loss.w_lpips > 0:
      self.lpips = lpips_lib.LPIPS(config.loss.lpips_net)
      self.lpips_params = lpips_lib.load_params(config.loss.lpips_net,
                                                config.loss.lpips_weights or None)
    mesh_cfg = config.get("mesh") or ml_collections.ConfigDict(
        dict(axes=("data", "fsdp"), shape=(-1, 1), fsdp_min_size=2 ** 18))
    try:
      self.mesh = sharding.make_mesh(mesh_cfg, devices)
    except sharding.MeshError as e:
      raise model_lib.ConfigError(str(e)) from None
    n_batch = int(np.prod([self.mesh.shape[a] for a in sharding.batch_axes(self.mesh)]))
    accum = int(config.train.get("grad_accum", 1))
    if accum < 1 or config.train.batch_size % (n_batch * accum):
      raise model_lib.ConfigError(
          f"config.train.batch_size={config.train.batch_size} must be divisible by the batch "
          f"shards ({n_batch} = data x fsdp of mesh {dict(self.mesh.shape)}) times "
          f"train.grad_accum={accum}")
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    abstract = jax.eval_shape(self._init_state, jax.random.PRNGKey(0))
    self.state_shardings = sharding.tree_shardings(abstract, self.mesh,
                                                   int(mesh_cfg.fsdp_min_size))
    self.abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        abstract, self.state_shardings)
    self.init_state = jax.jit(self._init_state, out_shardings=self.state_shardings)
    self.train_step = jax.jit(self._train_step,
                              in_shardings=(self.state_shardings, self.batch_sharding),
                              out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                              donate_argnums=(0,))

  # ---- state ----------------------------------------------------------------------------
  def _init_state(self, rng: jax.Array) -> Dict[str, Any]:
    k_model, k_disc, k_state = jax.random.split(rng, 3)
    s = self.config.image_size
    params = model_lib.init_params(self.model, k_model, image_size=s)
    disc_params = self.disc.init(k_disc, jnp.zeros((1, s, s, 3)))["params"]
    return dict(step=jnp.zeros((), jnp.int32), params=params,
                opt_g=self.opt_g.init(params), disc_params=disc_params,
                opt_d=self.opt_d.init(disc_params),
                ema_params=params if self.config.train.ema_decay > 0 else {},
                rng=k_state)

  def shard_batch(self, local_batch: np.ndarray) -> jax.Array:
    """This process's rows [B / processes, ...] -> the global batch, sharded over data x fsdp."""
    return sharding.global_batch(local_batch, self.batch_sharding)

  # ---- one step ---------------------------------------------------------------------------
  def sample_lambdas(self, rng, batch: int) -> jax.Array:
    cfg = self.config
    if cfg.model.lambda_conditioning:
      return jax.random.choice(rng, jnp.asarray(cfg.rd.lambdas, jnp.float32), (batch,))
    return jnp.full((batch,), cfg.rd.lmbda, jnp.float32)

  def _rec_loss(self, x, recon):
    lc = self.config.loss
    d = recon - x
    rec = jnp.mean(jnp.abs(d)) if lc.rec == "l1" else jnp.mean(d * d)
    out = lc.w_rec * rec
    if self.lpips is not None:
      out = out + lc.w_lpips * jnp.mean(self.lpips.apply({"params": self.lpips_params}, x, recon))
    return out

  def _micro_step(self, params, disc_params, step, x, lmbda, k_noise):
    """Gradients (generator, discriminator) and metrics of one micro-batch."""
    cfg, lc = self.config, self.config.loss
    ratios = jnp.asarray(cfg.granularity.ratios, jnp.float32)
    disc_on = (step >= lc.disc_start).astype(jnp.float32)
    use_gan = lc.w_gan > 0

    def gen_loss(params):
      out, inter = self.model.apply({"params": params}, x, lmbda, ratios, training=True,
                                    rngs={"noise": k_noise}, mutable=["intermediates"])
      recon = out["recon"]
      rec = self._rec_loss(x, recon)
      rate = jnp.mean(lmbda * out["bpp"])
      vq = out["codebook_loss"] + lc.beta * out["commitment_loss"]
      aux = dict(rec=rec, rate=rate, vq=vq)
      loss = rate + rec + vq
      if use_gan:
        gan_of = lambda r: losses.hinge_g(self.disc.apply({"params": disc_params}, r))
        g_gan = gan_of(recon)
        # VQGAN adaptive weight: gradient norms at the decoder's last conv kernel.
        r0 = jax.lax.stop_gradient(recon)
        h = jax.lax.stop_gradient(inter["intermediates"]["decoder"]["pre_out"][0])
        kernel = params["decoder"]["conv_out"]["kernel"]
        last = lambda k: jax.lax.conv_general_dilated(
            h, k.astype(h.dtype), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC")).astype(jnp.float32)
        _, pull = jax.vjp(last, jax.lax.stop_gradient(kernel))
        gw_rec = pull(jax.grad(lambda r: self._rec_loss(x, r))(r0))[0]
        gw_gan = pull(jax.grad(gan_of)(r0))[0]
        d_weight = losses.adaptive_weight(gw_rec, gw_gan) * lc.w_gan * disc_on
        loss = loss + d_weight * g_gan
        aux.update(g_gan=g_gan, d_weight=d_weight)
      return loss, (out, aux)

    (loss, (out, aux)), grads = jax.value_and_grad(gen_loss, has_aux=True)(params)
    metrics = {}
    d_grads = jax.tree.map(jnp.zeros_like, disc_params)
    if use_gan:
      fake = jax.lax.stop_gradient(out["recon"])

      def disc_loss(dp):
        apply = lambda im: self.disc.apply({"params": dp}, im)
        return losses.hinge_d(apply(x), apply(fake)) * disc_on

      metrics["d_loss"], d_grads = jax.value_and_grad(disc_loss)(disc_params)
    # usage of the first (or only) codebook stage; residual stages have their own entries
    sent_idx = jnp.concatenate([out["indices"][g].reshape(-1) for g in GRANULARITIES])
    sent = jnp.concatenate([out["masks"][g].reshape(-1) for g in GRANULARITIES])
    usage = codebook_lib.usage_stats(sent_idx, sent, cfg.model.codebook_size)
    hw = x.shape[1] * x.shape[2]
    metrics.update(loss=loss, bpp=jnp.mean(out["bpp"]),
                   psnr=-10 * jnp.log10(jnp.mean(((out["recon"] - x) / 2) ** 2)),
                   perplexity=usage["perplexity"], codebook_used=usage["used_fraction"],
                   **{k: v for k, v in aux.items()},
                   **{f"bpp_{k}": jnp.mean(v) / hw for k, v in out["bits"].items()})
    return grads, d_grads, metrics

  def _train_step(self, state, batch):
    cfg = self.config
    rng, k_noise, k_lam = jax.random.split(state["rng"], 3)
    x = batch.astype(jnp.float32) / 127.5 - 1.0
    lmbda = self.sample_lambdas(k_lam, x.shape[0])
    accum = int(cfg.train.get("grad_accum", 1))
    micro = functools.partial(self._micro_step, state["params"], state["disc_params"], state["step"])
    if accum == 1:
      grads, d_grads, metrics = micro(x, lmbda, k_noise)
    else:   # scan over micro-batches, averaging gradients and metrics
      split = lambda a: a.reshape((accum, a.shape[0] // accum) + a.shape[1:])
      xs, ls, ks = split(x), split(lmbda), jax.random.split(k_noise, accum)
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                           jax.eval_shape(micro, xs[0], ls[0], ks[0]))
      def body(acc, inp):
        return jax.tree.map(jnp.add, acc, micro(*inp)), None
      total, _ = jax.lax.scan(body, zeros, (xs, ls, ks))
      grads, d_grads, metrics = jax.tree.map(lambda a: a / accum, total)

    if cfg.train.get("trainable", "all") == "prior":
      # a plug-in prior: the optimiser never moves the tokenizer (make_optimizer's
      # set_to_zero); its gradients are also replaced by constants here so that XLA drops
      # their backward pass (measured: the plug-in step runs ~2.5x faster than a full step)
      # and they do not enter the finite check or grad_norm; the rate is then optimised
      # through the prior's params only
      grads = jax.tree_util.tree_map_with_path(
          lambda p, g: g if is_prior(p) else jnp.zeros_like(g), grads)
    params, opt_g = guarded_update(self.opt_g, grads, state["opt_g"], state["params"])
    # The count is reset by an update that was applied and grows with each one dropped
    # (a non-finite loss, gradient or update).
    finite = opt_g.notfinite_count == 0
    disc_params, opt_d = state["disc_params"], state["opt_d"]
    if cfg.loss.w_gan > 0:
      disc_params, opt_d = guarded_update(self.opt_d, d_grads, opt_d, disc_params)

    ema = state["ema_params"]
    if cfg.train.ema_decay > 0:
      dcy = cfg.train.ema_decay
      ema = jax.tree.map(lambda e, p: jnp.where(finite, dcy * e + (1 - dcy) * p, e), ema, params)
    metrics.update(grad_norm=optax.global_norm(grads), skipped=1.0 - finite.astype(jnp.float32),
                   bad_streak=opt_g.notfinite_count.astype(jnp.float32))
    new_state = dict(step=state["step"] + 1, params=params, opt_g=opt_g,
                     disc_params=disc_params, opt_d=opt_d, ema_params=ema, rng=rng)
    return new_state, metrics

  def eval_params(self, state):
    return state["ema_params"] if self.config.train.ema_decay > 0 else state["params"]


# ---- held-out evaluation ------------------------------------------------------------------
def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  h, w = img.shape[:2]
  s = min(size, h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return img[top:top + s, left:left + s]


@functools.partial(jax.jit, static_argnums=(0,))
def eval_forward(model, params, x_uint8, lmbda, ratios):
  """Eval-mode forward of uint8 images: (recon uint8, estimated bpp, indices, masks)."""
  x = x_uint8.astype(jnp.float32) / 127.5 - 1.0
  out = model.apply({"params": params}, x, jnp.full((x.shape[0],), lmbda), ratios)
  recon = jnp.clip(jnp.round((out["recon"] + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
  return recon, out["bpp"], out["indices"], out["masks"]


def evaluate(model, params, photos: Dict[str, np.ndarray], lmbdas, ratios,
             crop: int) -> Dict[str, Any]:
  """Per-lambda held-out figures: PSNR, MS-SSIM, estimated bpp, codebook usage."""
  batch = np.stack([center_crop(p, crop) for p in photos.values()])
  ratios = jnp.asarray(ratios, jnp.float32)
  results = {}
  for lm in lmbdas:
    recon, bpp, idx, masks = jax.device_get(eval_forward(model, params, batch, float(lm), ratios))
    used = np.concatenate([idx[g][masks[g]] for g in GRANULARITIES])   # first VQ stage
    per = [dict(name=n, psnr=metrics_lib.psnr(a, r), ms_ssim=metrics_lib.ms_ssim(a, r),
                bpp=float(b)) for n, a, r, b in zip(photos, batch, recon, bpp)]
    results[f"{float(lm):g}"] = dict(
        psnr=float(np.mean([p["psnr"] for p in per])),
        ms_ssim=float(np.mean([p["ms_ssim"] for p in per])),
        bpp=float(np.mean([p["bpp"] for p in per])),
        codebook_used=int(np.unique(used).size), images=per)
  return results


# ---- the program ---------------------------------------------------------------------------
PREEMPTED_EXIT_CODE = 75   # sysexits EX_TEMPFAIL: saved on SIGTERM, rerun to resume


# Device-to-host transfers allowed while a step that neither logs nor saves runs through
# the loop. The loop reads no step output there; tests set "disallow_explicit" (on
# accelerators any float()/np.asarray/device_get then raises; on the CPU backend, where
# arrays already live on the host, tests count reads of step outputs instead).
QUIET_STEP_TRANSFERS = "allow"


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite steps; nothing non-finite was saved."""


def _step_of(line: str) -> Optional[int]:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None   # a line cut short by a kill


class _EpathRecordWriter:
  """A TensorBoard event file on an object store: the whole file is uploaded at each of
  tensorboardX's flushes (every 2 minutes) and at close, never after close."""

  def __init__(self, path: str):
    self.path, self.buffer, self.closed = epath.Path(path), io.BytesIO(), False

  def write(self, data: bytes):
    self.buffer.write(data)

  def flush(self):
    if not self.closed:
      self.path.write_bytes(self.buffer.getvalue())

  def close(self):
    self.flush()
    self.closed = True


class _EpathRecordWriterFactory:
  def open(self, path):
    return _EpathRecordWriter(path)

  def directory_check(self, path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_through_epath(scheme: str) -> None:
  """tensorboardX's own gs:// writer re-uploads from __del__ after close (and retries for
  minutes once the store is gone): write event files through etils.epath instead."""
  from tensorboardX import record_writer
  record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())


class MetricWriter:
  """JSON lines (always) + TensorBoard (tensorboardX) on process 0 only.

  `workdir` may be a URL (gs://): object stores cannot append, so there the lines are kept
  in memory and the whole object is rewritten at most every `flush_secs` and at every
  checkpoint and at the end. Lines logged after `resume_step` (by a run killed before its
  next checkpoint) are dropped, so a resumed run's file has each step once.
  """

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0, flush_secs: float = 60.0):
    self.enabled = enabled
    self.tb = None
    self._jsonl = None
    if not enabled:
      return
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    self.path = root / "metrics.jsonl"
    self.url = ckpt_lib.is_url(workdir)
    self.flush_secs, self._last_flush, self._dirty = flush_secs, time.time(), False
    old = self.path.read_text().splitlines() if self.path.exists() else []
    keep = lambda l: (lambda s: s is not None and s <= resume_step)(_step_of(l))
    self.lines = [l for l in old if keep(l)]
    if len(self.lines) != len(old):
      self.path.write_text("".join(l + "\n" for l in self.lines))
    if not self.url:
      self._jsonl = open(self.path, "a")
      self.lines = None
    try:
      from tensorboardX import SummaryWriter
      if self.url:
        _tensorboard_through_epath(str(workdir).split(":", 1)[0])
      self.tb = SummaryWriter(ckpt_lib.join(workdir, "tb"))
    except ImportError:
      pass
    except Exception as e:   # noqa: BLE001 (TensorBoard is optional)
      print(f"TensorBoard logging off ({type(e).__name__}: {e}); metrics.jsonl has every value")

  def scalars(self, step: int, values: Dict[str, float]):
    if not self.enabled:
      return
    line = json.dumps(dict(step=int(step), **values))
    if self._jsonl is not None:
      self._jsonl.write(line + "\n")
      self._jsonl.flush()
    else:
      self.lines.append(line)
      self._dirty = True
      if time.time() - self._last_flush >= self.flush_secs:
        self.flush()
    if self.tb:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def flush(self):
    if self.enabled and self._jsonl is None and self._dirty:
      self.path.write_text("".join(l + "\n" for l in self.lines))
      self._dirty, self._last_flush = False, time.time()

  def images(self, step: int, name: str, grid: np.ndarray):
    if self.enabled and self.tb:
      self.tb.add_image(name, grid, step, dataformats="HWC")

  def close(self):
    if self.enabled:
      self.flush()
      if self._jsonl is not None:
        self._jsonl.close()
        self._jsonl = None
      if self.tb:
        self.tb.close()
        self.tb = None


def _image_grid(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
  return np.concatenate([np.concatenate(list(originals), 1), np.concatenate(list(recons), 1)], 0)


class _Preemption:
  """SIGTERM (preemption, scancel, TPU maintenance) -> save a checkpoint and stop.

  One process: our own SIGTERM handler. Several: JAX's preemption sync point, so every
  process stops at the same step and the collective save cannot deadlock.
  """

  def __init__(self):
    self.flag = False
    self._old = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.flag

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def host_params(trainer: "Trainer", params):
  """Params as host numpy on every process (gathered when sharded over processes)."""
  rep = sharding.replicated(trainer.mesh)
  return jax.device_get(jax.jit(lambda p: p, out_shardings=rep)(params))


@jax.jit
def _all_finite(tree) -> jax.Array:
  """True when no float leaf holds NaN or Inf (the largest |value| is finite: NaN
  propagates through max)."""
  peaks = [jnp.max(jnp.abs(a)) for a in jax.tree.leaves(tree)
           if jnp.issubdtype(a.dtype, jnp.floating) and a.size]
  return jnp.isfinite(functools.reduce(jnp.maximum, peaks)) if peaks else jnp.bool_(True)


# ---- resuming with another config -----------------------------------------------------------
# Settings that may change when a run resumes: they touch neither the saved state's shapes
# nor what the run computes per step (num_steps stretches the cosine decay to the new end).
SAFE_ON_RESUME = ("train.num_steps", "train.init_from", "train.log_every", "train.ckpt_every", "train.keep",
                  "train.keep_best", "train.async_checkpoint", "train.max_bad_steps",
                  "data.num_workers", "data.worker_buffer_size", "data.read_threads",
                  "data.device_prefetch",
                  "data.train_dir", "data.eval_dir", "data.tfds_data_dir",
                  "loss.lpips_weights", "eval.*", "mesh.*", "codec.*")
# Settings that shape the saved state: a checkpoint made with others cannot be restored.
STRUCTURAL = ("model.*", "disc.ch", "disc.n_layers")
# Settings that define the data stream: changed (with --allow_config_change), the
# data iterator starts afresh.
DATA_DEFINING = ("seed", "image_size", "train.batch_size", "data.source", "data.tfds_name",
                 "data.tfds_split", "data.min_scale", "data.flip", "data.color_hue_deg",
                 "data.color_saturation", "data.color_permute")


def _matches(key: str, patterns) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(stored: Dict[str, Any], config) -> Dict[str, list]:
  """Fields whose value differs between a checkpoint's config and this run's, sorted into
  `structural` (cannot restore), `changes` (restorable, but the run computes something
  else: needs allow_config_change) and `safe`. Each entry: (field, stored, new).
  Fields only one side has (added or removed by a newer version) are not compared."""
  old = _flatten(stored)
  new = _flatten(json.loads(config.to_json()))
  out = dict(structural=[], changes=[], safe=[])
  for k in sorted(set(old) & set(new)):
    a, b = old[k], new[k]
    if a == b:
      continue
    if _matches(k, SAFE_ON_RESUME):
      out["safe"].append((k, a, b))
    elif _matches(k, STRUCTURAL) or (k == "train.ema_decay" and (a > 0) != (b > 0)):
      out["structural"].append((k, a, b))
    else:
      out["changes"].append((k, a, b))
  return out


def check_resume_config(stored: Dict[str, Any], config, allow_config_change: bool,
                        where: str) -> Dict[str, list]:
  """Raise ConfigError naming every differing field unless the change is allowed."""
  diff = config_changes(stored, config)
  fmt = lambda items: "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in items)
  safe_list = ", ".join(SAFE_ON_RESUME)
  if diff["structural"]:
    raise model_lib.ConfigError(
        f"cannot resume {where}: its checkpoint was made with another model, so its arrays "
        f"have other shapes:\n{fmt(diff['structural'])}\nUse the config the run was started "
        f"with (the checkpoint's config is restored by `hvq eval`/`hvq compress`), or start "
        f"a new --workdir. Safe to change on resume: {safe_list}")
  if diff["changes"] and not allow_config_change:
    raise model_lib.ConfigError(
        f"resuming {where} with settings that differ from its checkpoint:\n"
        f"{fmt(diff['changes'])}\nThese change what the run computes. Pass the values the run "
        f"was started with, or --allow_config_change to continue with the new ones. "
        f"Safe to change on resume: {safe_list}")
  return diff


def eval_photos(config) -> Dict[str, np.ndarray]:
  """The held-out photos of the final evaluation (checked before training starts)."""
  d = config.data
  if d.source == "bundled":
    return images_lib.bundled_photos("heldout")
  if d.source == "folder":
    paths = images_lib.list_images(d.eval_dir)
    photos = {os.path.basename(p): images_lib.read_image(p) for p in paths}
  else:
    src = images_lib.TfdsImages(d.tfds_name, d.tfds_eval_split, d.tfds_data_dir)
    n = min(len(src), int(config.eval.get("num_images", 16)))
    photos = {f"{d.tfds_name}_{i:05d}": src[i] for i in range(n)}
  # The evaluation is one batch of centre crops: all of them must have the full size.
  size = config.eval.image_size
  small = [k for k, v in photos.items() if min(v.shape[:2]) < size]
  photos = {k: v for k, v in photos.items() if k not in small}
  if small:
    print(f"evaluation: {len(small)} image(s) smaller than eval.image_size={size} left out")
  if not photos:
    raise model_lib.ConfigError(
        f"no held-out image of at least {size} px for the final evaluation in "
        f"data.source={d.source!r}; lower config.eval.image_size or set "
        f"--config.eval.enabled=False")
  return photos


def _check_eval_source(config) -> None:
  d = config.data
  if not config.eval.enabled:
    return
  if d.source == "folder" and not d.eval_dir:
    raise model_lib.ConfigError(
        "config.data.eval_dir is empty: the final evaluation needs held-out images "
        "(set --config.data.eval_dir=DIR, or --config.eval.enabled=False)")
  if d.source == "tfds" and not d.tfds_eval_split:
    raise model_lib.ConfigError(
        "config.data.tfds_eval_split is empty: set it (e.g. 'validation'), or "
        "--config.eval.enabled=False")


def _trainer_fields(config) -> Dict[str, Any]:
  """The settings a Trainer is built from (not logging, checkpointing, data or eval)."""
  flat = _flatten(json.loads(config.to_json()))
  loop_only = ("train.log_every", "train.ckpt_every", "train.keep", "train.keep_best",
               "train.async_checkpoint", "train.max_bad_steps", "data.*", "eval.*", "codec.*")
  return {k: v for k, v in flat.items() if not _matches(k, loop_only)}


def train_and_evaluate(config, workdir: str, progress: bool = True,
                       allow_config_change: bool = False,
                       trainer: Optional["Trainer"] = None) -> Dict[str, Any]:
  """Train (resuming from the newest checkpoint in workdir), then evaluate held-out photos.

  `workdir` may be a local folder or a URL such as gs://bucket/run (every host of a pod
  must see the same checkpoints). Returns dict(state, eval, preempted).
  Raises TrainingDiverged after train.max_bad_steps consecutive non-finite steps.
  `trainer`: a Trainer built for this same config, to reuse its compiled step.
  """
  from tqdm import tqdm
  _check_eval_source(config)
  if trainer is None:
    trainer = Trainer(config)
  elif _trainer_fields(trainer.config) != _trainer_fields(config):
    raise ValueError("train_and_evaluate: the trainer was built for another config")
  tc = config.train
  max_bad = int(tc.max_bad_steps)
  if max_bad < 1:
    raise model_lib.ConfigError(f"config.train.max_bad_steps must be >= 1, got {max_bad}")
  workdir = ckpt_lib.normalize(workdir)
  is_main = jax.process_index() == 0
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.join(workdir, "checkpoints"), keep=tc.keep,
                               keep_best=tc.keep_best, best_metric="loss",
                               async_save=tc.async_checkpoint)
  writer = None
  preemption = None
  try:
    data_iter = iter(data_lib.train_dataset(config, jax.process_index(), jax.process_count()))
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
      try:
        stored = ckpt.restore_config(latest)
      except Exception:   # noqa: BLE001 (a checkpoint from before configs were saved)
        stored = None
      diff = dict(safe=[], changes=[])
      if stored is not None:
        diff = check_resume_config(stored, config, allow_config_change, workdir)
      changed = {k for k, _, _ in diff["changes"]}
      restart_data = any(_matches(k, DATA_DEFINING) for k in changed)
      # Restores onto this run's mesh, whatever mesh wrote it (Orbax reshards).
      state = ckpt.restore(latest, trainer.abstract_state, None if restart_data else data_iter)
      start = int(jax.device_get(state["step"]))
      if is_main:
        print(f"resumed from step {start} in {ckpt.directory}")
        for k, a, b in diff["safe"] + diff["changes"]:
          print(f"  {k}: {a!r} -> {b!r}")
        if restart_data:
          print("  the data stream starts afresh (its definition changed)")
    else:
      state = trainer.init_state(jax.random.PRNGKey(config.seed))
      if tc.get("init_from", ""):
        new, report = init_from(state["params"], tc.init_from)
        new = jax.device_put(new, trainer.state_shardings["params"])
        state = dict(state, params=new,
                     ema_params=new if tc.ema_decay > 0 else state["ema_params"])
        if is_main:
          print(f"initialised from {tc.init_from}: {len(report['loaded'])} arrays loaded, "
                f"{len(report['kept_init'])} at init, {len(report['shape_mismatch'])} of "
                f"another shape kept at init, {len(report['unused'])} unused")
      # The initial checkpoint: written once, only when nothing was restored (a restored
      # step is never saved again: Orbax refuses a step that exists).
      ckpt.save(0, state, data_iter, config, metrics=None, force=True)
    writer = MetricWriter(workdir, is_main, resume_step=start)
    bar = tqdm(total=tc.num_steps, initial=start, disable=not (progress and is_main),
               unit="step", dynamic_ncols=True)
    preemption = _Preemption()
    preempted = False
    t0, seen = time.time(), 0
    losses_since_save = []   # finite logged losses: the "best" metric of the next save
    last_saved = start

    def save(step, force=False):
      nonlocal losses_since_save, last_saved
      if not bool(jax.device_get(_all_finite(state))):
        raise TrainingDiverged(f"step {step}: the training state holds NaN or Inf; not saved "
                               f"(the newest checkpoint, step {last_saved}, is finite)")
      metrics = {"loss": float(np.mean(losses_since_save))} if losses_since_save else None
      ckpt.save(step, state, feed.checkpoint_item(), config, metrics=metrics, force=force)
      losses_since_save, last_saved = [], step
      writer.flush()

    # Batches go onto the mesh one step ahead (DevicePrefetch), and the loop waits on the
    # device only at log and checkpoint steps: in between it dispatches steps (JAX runs
    # them asynchronously) and never reads a step's outputs. `inflight` bounds how far the
    # host runs ahead (each queued step holds its input batch in device memory): before
    # dispatching more, it waits (block_until_ready, no transfer) for the step `depth`
    # steps back, which leaves the device `depth` steps of work.
    depth = max(1, int(config.data.get("device_prefetch", 2)))
    feed = data_lib.DevicePrefetch(data_iter, trainer.shard_batch, depth)
    inflight = collections.deque()
    for step in range(start, tc.num_steps):
      done = step + 1
      will_save = done % tc.ckpt_every == 0 or done == tc.num_steps
      will_log = done % tc.log_every == 0 or will_save
      with jax.transfer_guard_device_to_host("allow" if will_log else QUIET_STEP_TRANSFERS):
        batch = next(feed)
        state, m = trainer.train_step(state, batch)
        seen += batch.shape[0]
        inflight.append(m["loss"])
        if len(inflight) > depth:
          inflight.popleft().block_until_ready()
      if will_log:
        inflight.clear()
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = time.time() - t0
        m["images_per_s"] = seen / max(dt, 1e-9)
        t0, seen = time.time(), 0
        if m["skipped"] and is_main:
          print(f"step {done}: non-finite loss or gradient, update skipped "
                f"({int(m['bad_streak'])} in a row)")
        if math.isfinite(m["loss"]):
          losses_since_save.append(m["loss"])
        writer.scalars(done, m)
        if m["bad_streak"] >= max_bad:
          raise TrainingDiverged(
              f"training diverged: {int(m['bad_streak'])} consecutive steps with a non-finite "
              f"loss or gradient, up to step {done} (train.max_bad_steps={max_bad}). Every one "
              f"was skipped and nothing after step {last_saved} was saved: the newest "
              f"checkpoint holds finite params. Lower train.lr or check the data, then rerun.")
        bar.set_postfix(loss=f"{m['loss']:.3f}", bpp=f"{m['bpp']:.3f}",
                        psnr=f"{m['psnr']:.1f}", img_s=f"{m['images_per_s']:.1f}")
      bar.update(1)
      if preemption.reached(done):
        save(done, force=True)
        preempted = True
        if is_main:
          print(f"preempted: saved step {done}; relaunch the same command to resume "
                f"(exit code {PREEMPTED_EXIT_CODE})")
        break
      if will_save:
        save(done)
    bar.close()
    ckpt.wait()
  except BaseException:
    if writer is not None:
      writer.close()
    raise
  finally:
    if preemption is not None:
      preemption.close()
    ckpt.close()      # waits for a save in flight: a failure above keeps the saves before it

  results = {}
  if config.eval.enabled and not preempted:
    photos = eval_photos(config)
    params = host_params(trainer, trainer.eval_params(state))
    results = evaluate(trainer.model, params, photos, config.rd.lambdas,
                       config.granularity.ratios, config.eval.image_size)
    if is_main:
      (epath.Path(workdir) / "eval.json").write_text(
          json.dumps(dict(step=int(jax.device_get(state["step"])), results=results), indent=1))
      print(format_eval(results))
      batch = np.stack([center_crop(p, config.eval.image_size) for p in photos.values()])
      recon = jax.device_get(eval_forward(trainer.model, params, batch, float(config.rd.lmbda),
                                      jnp.asarray(config.granularity.ratios)))[0]
      writer.images(int(jax.device_get(state["step"])), "heldout/original_vs_recon",
                    _image_grid(batch, recon))
  writer.close()
  return dict(state=state, eval=results, preempted=preempted)


def format_eval(results: Dict[str, Any]) -> str:
  lines = ["held-out photos (estimated bpp from the rate model):",
           f"{'lambda':>8} {'bpp':>7} {'PSNR':>7} {'MS-SSIM':>8} {'codes used':>10}"]
  for lm, r in results.items():
    lines.append(f"{lm:>8} {r['bpp']:7.4f} {r['psnr']:7.2f} {r['ms_ssim']:8.4f} "
                 f"{r['codebook_used']:>10}")
  return "\n".join(lines)
