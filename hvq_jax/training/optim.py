"""The generator's and discriminator's optimiser: Adam with warmup-cosine, clipping, the
finite-update guard, and frozen params for a plug-in prior."""
import jax
import jax.numpy as jnp
import optax

PRIOR_PREFIXES = ("hyper_", "static_")   # the index prior's params (nn/model.py names)


def is_prior(path) -> bool:
  """Is this params path part of the index prior (a hyperprior branch or static histogram)?"""
  return str(getattr(path[0], "key", path[0])).startswith(PRIOR_PREFIXES)


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
