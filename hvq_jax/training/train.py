"""`hvq train`: generator + PatchGAN discriminator training with rate control.

One jitted step updates both networks (VQGAN recipe): the generator minimises
  mean(lambda_i * bpp_i) + w_rec * rec + w_lpips * LPIPS + a * w_gan * hinge_G + VQ,
the discriminator the hinge loss, both switched on for the GAN only after disc_start.
Lambda is sampled per example from config.rd.lambdas and fed to the networks.
"""
import functools
import json
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


def make_optimizer(tc, lr: float) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(tc.warmup_steps, 1), max(tc.num_steps, tc.warmup_steps + 1), lr * tc.final_lr_frac)
  opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                    optax.adam(sched, b1=tc.b1, b2=tc.b2))
  # A non-finite update is dropped (params and moments unchanged) and counted.
  return optax.apply_if_finite(opt, max_consecutive_errors=tc.max_bad_steps)


class Trainer:
  """Builds the model, optimisers, the mesh and the jitted, sharded step for a config.

  `devices` (default: all) is what the mesh is built on; the codec passes one device.
  """

  def __init__(self, config, devices=None):
    validate_config(config)
    self.config = config
    self.model = model_lib.build(config.model)
    self.disc = PatchGAN(config.disc.ch, config.disc.n_layers, min(32, config.disc.ch))
    self.opt_g = make_optimizer(config.train, config.train.lr)
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

    updates, opt_g = self.opt_g.update(grads, state["opt_g"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(optax.global_norm(grads))
    disc_params, opt_d = state["disc_params"], state["opt_d"]
    if cfg.loss.w_gan > 0:
      d_updates, opt_d = self.opt_d.update(d_grads, opt_d, disc_params)
      disc_params = optax.apply_updates(disc_params, d_updates)

    ema = state["ema_params"]
    if cfg.train.ema_decay > 0:
      dcy = cfg.train.ema_decay
      ema = jax.tree.map(lambda e, p: jnp.where(finite, dcy * e + (1 - dcy) * p, e), ema, params)
    metrics.update(grad_norm=optax.global_norm(grads), skipped=1.0 - finite.astype(jnp.float32))
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
class MetricWriter:
  """JSON lines (always) + TensorBoard (tensorboardX) on process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:
        pass

  def scalars(self, step: int, values: Dict[str, float]):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps(dict(step=int(step), **values)) + "\n")
    self.jsonl.flush()
    if self.tb:
      for k, v in values.items():
        self.tb.add_scalar(k, v, step)

  def images(self, step: int, name: str, grid: np.ndarray):
    if self.enabled and self.tb:
      self.tb.add_image(name, grid, step, dataformats="HWC")

  def close(self):
    if self.enabled:
      self.jsonl.close()
      if self.tb:
        self.tb.close()


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


def host_params(trainer: "Trainer", params):
  """Params as host numpy on every process (gathered when sharded over processes)."""
  rep = sharding.replicated(trainer.mesh)
  return jax.device_get(jax.jit(lambda p: p, out_shardings=rep)(params))


def train_and_evaluate(config, workdir: str, progress: bool = True) -> Dict[str, Any]:
  """Train (resuming from the newest checkpoint in workdir), then evaluate held-out photos."""
  from tqdm import tqdm
  trainer = Trainer(config)
  tc = config.train
  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, is_main)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep,
                               keep_best=tc.keep_best, best_metric="loss",
                               async_save=tc.async_checkpoint)
  data_iter = iter(data_lib.train_dataset(config, jax.process_index(), jax.process_count()))
  start = 0
  if ckpt.latest_step() is not None:
    # Restores onto this run's mesh, whatever mesh wrote it (Orbax reshards).
    state = ckpt.restore(None, trainer.abstract_state, data_iter)
    start = int(state["step"])
    if is_main:
      print(f"resumed from step {start} in {ckpt.directory}")
  else:
    state = trainer.init_state(jax.random.PRNGKey(config.seed))
  if tc.num_steps == 0 or start == 0:
    ckpt.save(start, state, data_iter, config, metrics=None, force=True)
  bar = tqdm(total=tc.num_steps, initial=start, disable=not (progress and is_main),
             unit="step", dynamic_ncols=True)
  preemption = _Preemption()
  preempted = False
  t0, seen, last = time.time(), 0, {}
  for step in range(start, tc.num_steps):
    batch = trainer.shard_batch(next(data_iter))
    state, m = trainer.train_step(state, batch)
    seen += batch.shape[0]
    done = step + 1
    if done % tc.log_every == 0 or done == tc.num_steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      dt = time.time() - t0
      m["images_per_s"] = seen / max(dt, 1e-9)
      t0, seen = time.time(), 0
      if m["skipped"] and is_main:
        print(f"step {done}: non-finite loss or gradient, update skipped")
      writer.scalars(done, m)
      bar.set_postfix(loss=f"{m['loss']:.3f}", bpp=f"{m['bpp']:.3f}",
                      psnr=f"{m['psnr']:.1f}", img_s=f"{m['images_per_s']:.1f}")
      last = m
    bar.update(1)
    if preemption.reached(done):
      ckpt.save(done, state, data_iter, config, metrics={"loss": last.get("loss", 0.0)}, force=True)
      preempted = True
      if is_main:
        print(f"preempted: saved step {done}; relaunch the same command to resume")
      break
    if done % tc.ckpt_every == 0 or done == tc.num_steps:
      ckpt.save(done, state, data_iter, config, metrics={"loss": last.get("loss", 0.0)})
  bar.close()
  preemption.close()
  ckpt.wait()
  ckpt.close()

  results = {}
  if config.eval.enabled and not preempted:
    photos = images_lib.bundled_photos("heldout") if config.data.source == "bundled" else \
        {os.path.basename(p): images_lib.read_image(p)
         for p in images_lib.list_images(config.data.eval_dir)}
    params = host_params(trainer, trainer.eval_params(state))
    results = evaluate(trainer.model, params, photos, config.rd.lambdas,
                       config.granularity.ratios, config.eval.image_size)
    if is_main:
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(dict(step=int(jax.device_get(state["step"])), results=results), f, indent=1)
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
