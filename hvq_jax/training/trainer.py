"""The training state and one step: generator + PatchGAN discriminator with rate control.

One jitted step updates both networks (VQGAN recipe): the generator minimises
  mean(lambda_i * bpp_i) + w_rec * rec + w_lpips * LPIPS + a * w_gan * hinge_G + VQ,
the discriminator the hinge loss, both switched on for the GAN only after disc_start.
Lambda is sampled per example from config.rd.lambdas and fed to the networks.
"""
import functools
from typing import Any, Dict

import numpy as np
import jax
import jax.numpy as jnp
import optax

from hvq_jax.layout import GRANULARITIES
from hvq_jax.nn import codebook as codebook_lib
from hvq_jax.nn import lpips as lpips_lib
from hvq_jax.nn import model as model_lib
from hvq_jax.training import losses
from hvq_jax.training import phases as phases_lib
from hvq_jax.training import sharding
from hvq_jax.training.discriminator import PatchGAN
from hvq_jax.training.optim import guarded_update, is_prior, make_disc_optimizer, make_optimizer


def validate_config(config) -> None:
  model_lib.validate(config.model)
  model_lib.check_ratios(config.granularity.ratios)
  for r in config.granularity.train_ratios:
    model_lib.check_ratios(r)
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
  trainable = config.train.trainable
  if trainable not in ("all", "prior"):
    err(f"config.train.trainable must be 'all' or 'prior', got {trainable!r}")
  if trainable == "prior" and not config.train.init_from:
    err("config.train.trainable='prior' trains a prior for a frozen tokenizer: set "
        "config.train.init_from to the run whose encoder, codebooks and decoder it freezes")
  for why in phases_lib.errors(config):
    err(why)


class Trainer:
  """Builds the model, optimisers, the mesh and the jitted, sharded step for a config.

  `devices` (default: all) is what the mesh is built on (tests build meshes on subsets).
  """

  def __init__(self, config, devices=None):
    validate_config(config)
    self.config = config
    self.model = model_lib.build(config.model)
    self.disc = PatchGAN(config.disc.ch, config.disc.n_layers, min(32, config.disc.ch))
    self.phases = phases_lib.plan(config)
    self.opt_g = make_optimizer(config.train, self.phases)
    self.opt_d = make_disc_optimizer(config.train)
    self.lpips = None
    self.lpips_params = None
    if config.loss.w_lpips > 0:
      self.lpips = lpips_lib.LPIPS(config.loss.lpips_net)
      self.lpips_params = lpips_lib.load_params(config.loss.lpips_net,
                                                config.loss.lpips_weights or None)
    mesh_cfg = config.mesh
    try:
      self.mesh = sharding.make_mesh(mesh_cfg, devices)
    except sharding.MeshError as e:
      raise model_lib.ConfigError(str(e)) from None
    n_batch = int(np.prod([self.mesh.shape[a] for a in sharding.batch_axes(self.mesh)]))
    accum = int(config.train.grad_accum)
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
    # One program per phase, compiled when its phase first runs: a lax.switch over the
    # phases in one program ran 40x slower per step on XLA:CPU than its branches alone.
    self.phase_steps = [
        jax.jit(functools.partial(self._phase_step, i, p.name),
                in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                donate_argnums=(0,))
        for i, p in enumerate(self.phases)]
    self.train_step = self.phase_steps[0] if len(self.phases) == 1 else self._train_step

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

  def sample_ratios(self, rng) -> jax.Array:
    """The step's granularity ratios [3]: one of granularity.train_ratios (each step its
    own), or granularity.ratios when that is empty."""
    g = self.config.granularity
    if not g.train_ratios:
      return jnp.asarray(g.ratios, jnp.float32)
    table = jnp.asarray(g.train_ratios, jnp.float32)
    return table[jax.random.randint(rng, (), 0, table.shape[0])]

  def _micro_step(self, prior, params, disc_params, step, ratios, x, lmbda, k_noise):
    """Gradients (generator, discriminator) and metrics of one micro-batch, the rate
    priced by `prior` ('hyper' | 'static', `HVQ.__call__`)."""
    cfg, lc = self.config, self.config.loss
    disc_on = (step >= lc.disc_start).astype(jnp.float32)
    use_gan = lc.w_gan > 0

    def gen_loss(params):
      out, inter = self.model.apply({"params": params}, x, lmbda, ratios, training=True,
                                    prior=prior, rngs={"noise": k_noise},
                                    mutable=["intermediates"])
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

  def step_for(self, step: int):
    """The compiled step of the phase that step `step` (0-based, a host int) is in."""
    if len(self.phases) == 1:
      return self.train_step
    return self.phase_steps[phases_lib.index(self.phases, step)]

  def _train_step(self, state, batch):
    """One step of the phase the state's step is in (reads the step from the device: the
    training loop, which knows it, calls `step_for` instead)."""
    return self.step_for(int(jax.device_get(state["step"])))(state, batch)

  def _phase_step(self, index: int, phase: str, state, batch):
    cfg = self.config
    rng, k_noise, k_lam = jax.random.split(state["rng"], 3)
    x = batch.astype(jnp.float32) / 127.5 - 1.0
    lmbda = self.sample_lambdas(k_lam, x.shape[0])
    # a key of its own (folded from the lambda key) so that one fixed ratio draws nothing
    ratios = self.sample_ratios(jax.random.fold_in(k_lam, 1))
    accum = int(cfg.train.grad_accum)
    micro = functools.partial(self._micro_step, "static" if phase == "tokenizer" else "hyper",
                              state["params"], state["disc_params"], state["step"], ratios)
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

    if phase == "prior":
      # the tokenizer is frozen: its optimiser group is held (guarded_update) and its
      # gradients are replaced by constants, so that XLA drops their backward pass
      # (measured: a prior step runs ~2.5x faster than a full step) and they enter neither
      # the finite check nor grad_norm; the rate is then optimised through the prior only
      grads = jax.tree_util.tree_map_with_path(
          lambda p, g: g if is_prior(p) else jnp.zeros_like(g), grads)
    params, opt_g = guarded_update(self.opt_g, grads, state["opt_g"], state["params"],
                                   hold="tokenizer" if phase == "prior" else "")
    # The count is reset by an update that was applied and grows with each one dropped
    # (a non-finite loss, gradient or update).
    finite = opt_g.notfinite_count == 0
    disc_params, opt_d = state["disc_params"], state["opt_d"]
    if cfg.loss.w_gan > 0 and phase != "prior":
      disc_params, opt_d = guarded_update(self.opt_d, d_grads, opt_d, disc_params)

    ema = state["ema_params"]
    if cfg.train.ema_decay > 0:
      dcy = cfg.train.ema_decay
      ema = jax.tree.map(lambda e, p: jnp.where(finite, dcy * e + (1 - dcy) * p, e), ema, params)
    metrics.update(grad_norm=optax.global_norm(grads), skipped=1.0 - finite.astype(jnp.float32),
                   bad_streak=opt_g.notfinite_count.astype(jnp.float32),
                   phase=jnp.float32(index))
    new_state = dict(step=state["step"] + 1, params=params, opt_g=opt_g,
                     disc_params=disc_params, opt_d=opt_d, ema_params=ema, rng=rng)
    return new_state, metrics

  def eval_params(self, state):
    return state["ema_params"] if self.config.train.ema_decay > 0 else state["params"]
