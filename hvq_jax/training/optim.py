"""The generator's and discriminator's optimisers: Adam with warmup-cosine schedules per
phase (`phases.py`), clipping, the finite-update guard, and two param groups (tokenizer,
prior) that a phase can train or hold."""
import jax
import jax.numpy as jnp
import optax

PRIOR_PREFIXES = ("hyper_", "static_")   # the index prior's params (nn/model.py names)


def is_prior(path) -> bool:
  """Is this params path part of the index prior (a hyperprior branch or static histogram)?"""
  return str(getattr(path[0], "key", path[0])).startswith(PRIOR_PREFIXES)


def labels(params):
  """'prior' or 'tokenizer' for every leaf of a params tree: the optimiser's two groups."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "prior" if is_prior(p) else "tokenizer", params)


def _warmup_cosine(tc, lr: float, steps: int) -> optax.Schedule:
  warm = max(tc.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1),
                                            lr * tc.final_lr_frac)


def schedule(tc, phases) -> optax.Schedule:
  """The phases' warmup-cosine schedules one after the other, as a function of the number of
  updates a group has made. Each phase warms up over train.warmup_steps, at most a quarter
  of its length when it follows another phase (a short prior phase must not spend its
  steps warming up)."""
  if not phases:   # a group no phase trains
    return _warmup_cosine(tc, tc.lr, 0)
  parts, bounds, done = [], [], 0
  for i, p in enumerate(phases):
    warm = max(1, tc.warmup_steps if i == 0 else min(tc.warmup_steps, p.steps // 4))
    parts.append(optax.warmup_cosine_decay_schedule(
        0.0, p.lr, warm, max(p.steps, warm + 1), p.lr * tc.final_lr_frac))
    done += p.steps
    bounds.append(done)
  return optax.join_schedules(parts, bounds[:-1]) if len(parts) > 1 else parts[0]


def make_optimizer(tc, phases) -> optax.GradientTransformation:
  """The generator's optimiser: clipping, then Adam for each group ('tokenizer', 'prior';
  `labels`) on the schedule of the phases that train it, and the finite-update guard. A
  group that no phase trains (the tokenizer of a plug-in prior) gets optax.set_to_zero: no
  update and no Adam moments. A group held in a phase (`guarded_update(hold=...)`) keeps
  its state, so its schedule counts only the steps that train it."""
  tok = [p for p in phases if p.name != "prior"]
  groups = dict(prior=_adam(tc, schedule(tc, phases)),
                tokenizer=_adam(tc, schedule(tc, tok)) if tok else optax.set_to_zero())
  opt = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                    optax.multi_transform(groups, labels))
  return _guard(opt)


def make_disc_optimizer(tc) -> optax.GradientTransformation:
  """The discriminator's: one Adam on train.disc_lr's warmup-cosine over the whole run."""
  return _guard(optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                            _adam(tc, _warmup_cosine(tc, tc.disc_lr, tc.num_steps))))


def _adam(tc, sched):
  return optax.adam(sched, b1=tc.b1, b2=tc.b2)


def _guard(opt):
  # A non-finite update is dropped (params and moments unchanged) and counted, however
  # many come in a row: optax would apply the NaN update after `max_consecutive_errors`,
  # so that limit is never reached here; train_and_evaluate stops the run instead after
  # train.max_bad_steps consecutive bad steps.
  return optax.apply_if_finite(opt, max_consecutive_errors=2 ** 30)


def _hold(new, old, label: str):
  """`new` with group `label`'s optimiser state taken from `old` (the state that
  `make_optimizer` builds: apply_if_finite(chain(clip, multi_transform)))."""
  clip, mt = new.inner_state
  groups = dict(mt.inner_states)
  groups[label] = old.inner_state[1].inner_states[label]
  return new._replace(inner_state=(clip, mt._replace(inner_states=groups)))


def guarded_update(opt, grads, opt_state, params, hold: str = ""):
  """One optimiser step that is dropped whole when the gradients or the resulting update
  are non-finite. optax.apply_if_finite looks at the gradients only: a NaN made inside
  the optimiser (its moments) would reach the params. Keeps apply_if_finite's state,
  counting a dropped update in `notfinite_count` as it does. `hold` names a group
  (`make_optimizer`) that does not move this step: no update, its state kept."""
  updates, new_state = opt.update(grads, opt_state, params)
  if hold:
    updates = jax.tree.map(lambda u, l: jnp.zeros_like(u) if l == hold else u,
                           updates, labels(updates))
    new_state = _hold(new_state, opt_state, hold)
  # (one reduction: a per-leaf isfinite made XLA's compile take 6x the memory)
  ok = jnp.isfinite(optax.global_norm(updates))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
  new_params = keep(optax.apply_updates(params, updates), params)
  dropped = (new_state.notfinite_count > 0) | ~ok
  new_state = keep(new_state, opt_state)._replace(
      notfinite_count=jnp.where(dropped, opt_state.notfinite_count + 1, 0),
      total_notfinite=opt_state.total_notfinite + dropped.astype(jnp.int32))
  return new_params, new_state
