"""Training program: exact resume in every way a run stops (step-0 workdirs, imports,
kills during a save, changed configs), the NaN guard, best checkpoints, RD behaviour.

One Trainer (past warmup from step 1, grad accumulation, the GAN on from step 0) serves
every in-process run here, so its step compiles once. The reference everywhere is an
uninterrupted run of the same config.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax.nn.model import ConfigError
from hvq_jax.training import train
from hvq_jax.training import optim, phases, resume
from tests import conftest
from tests.conftest import micro_config

STEPS = conftest.TRAIN_STEPS
resume_config = conftest.train_config
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(trainer, wd, **kw):
  return jax.device_get(train.train_and_evaluate(resume_config(), wd, progress=False,
                                                 trainer=trainer, **kw)["state"])


def _assert_same(a, b):
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def _copy_steps(src_wd, dst_wd, steps):
  os.makedirs(os.path.join(dst_wd, "checkpoints"), exist_ok=True)
  for s in steps:
    shutil.copytree(os.path.join(src_wd, "checkpoints", str(s)),
                    os.path.join(dst_wd, "checkpoints", str(s)))


def _steps_logged(wd):
  return [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl"))]


def test_straight_run_is_past_warmup_with_gan_and_accumulation(straight, trainer):
  wd, state = straight
  assert int(state["step"]) == STEPS
  assert ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints")).all_steps() == [0, 2, 3]
  init = jax.device_get(trainer.init_state(jax.random.PRNGKey(0)))
  # The discriminator trained (GAN on) and the generator moved.
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(state["disc_params"]),
                                            jax.tree.leaves(init["disc_params"])))
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert all(l["d_weight"] > 0 for l in lines) and all(l["skipped"] == 0 for l in lines)
  assert all({"loss", "bpp", "psnr", "bpp_z", "bpp_map"} <= set(l) for l in lines)


def test_optimizer_never_applies_a_nonfinite_update():
  """optax.apply_if_finite(max_consecutive_errors=n) applies the NaN update after n bad
  steps; ours never does (the training loop stops the run instead)."""
  import optax
  c = resume_config()
  c.train.max_bad_steps = 2
  params = {"w": jnp.ones(3)}
  for opt, finite_after in [(optim.make_optimizer(c.train, phases.plan(c)), True),
                            (optax.apply_if_finite(optax.adam(1e-3), 2), False)]:
    st, p = opt.init(params), params
    for _ in range(5):
      u, st = opt.update({"w": jnp.full(3, jnp.nan)}, st, p)
      p = optax.apply_updates(p, u)
    assert bool(jnp.all(jnp.isfinite(p["w"]))) == finite_after


def test_resume_mid_run_is_bitwise_exact(straight, trainer, tmp_path):
  """Resume at step 2 (past warmup, accumulation, GAN): same params, optimiser moments,
  discriminator and RNG as the straight run at step 3."""
  wd, ref = straight
  mine = str(tmp_path / "w")
  _copy_steps(wd, mine, [0, 2])
  _assert_same(_run(trainer, mine), ref)
  assert _steps_logged(mine) == [3]


@pytest.mark.parametrize("flow", ["num_steps_0",   # the README's flow in the fast suite
                                  pytest.param("killed_before_first_checkpoint", marks=pytest.mark.slow),
                                  pytest.param("import", marks=pytest.mark.slow)])
def test_step0_workdir_resumes(flow, straight, trainer, tmp_path):
  """A workdir whose newest checkpoint is step 0 trains on (Orbax used to refuse saving
  step 0 again) and gives the straight run's numbers."""
  wd, ref = straight
  mine = str(tmp_path / "w")
  if flow == "num_steps_0":
    # `hvq train --config.train.num_steps=0` as the README says: writes the initial
    # checkpoint; then the same command without the override.
    out = train.train_and_evaluate(resume_config(0), mine, progress=False)
    assert int(out["state"]["step"]) == 0
    ck = ckpt_lib.Checkpointer(os.path.join(mine, "checkpoints"))
    assert ck.all_steps() == [0] and ck.restore_config()["train"]["num_steps"] == 0
    ck.close()
  elif flow == "killed_before_first_checkpoint":
    _copy_steps(wd, mine, [0])
    # What a killed run leaves: step 0 and metric lines past it (one cut short).
    with open(os.path.join(mine, "metrics.jsonl"), "w") as f:
      f.write('{"step": 1, "loss": 9}\n{"step": 2, "loss": 9}\n{"step": 3, "lo')
  else:
    # What `hvq import` writes: step 0 with the state and config, no data iterator.
    ck = ckpt_lib.Checkpointer(os.path.join(mine, "checkpoints"), async_save=False)
    ck.save(0, trainer.init_state(jax.random.PRNGKey(0)), None, resume_config(), force=True)
    ck.close()
  _assert_same(_run(trainer, mine), ref)
  assert _steps_logged(mine) == [1, 2, 3]


def test_changed_config_is_named(straight, trainer, tmp_path):
  wd, _ = straight
  mine = str(tmp_path / "w")
  _copy_steps(wd, mine, [STEPS])
  c = resume_config()
  c.model.codebook_size = 32
  c.disc.n_layers = 3
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(c, mine, progress=False)
  msg = str(e.value)
  assert "model.codebook_size: 64 in the checkpoint, 32 now" in msg
  assert "disc.n_layers: 2 in the checkpoint, 3 now" in msg
  assert "train.num_steps" in msg   # the list of settings safe to change
  c = resume_config()
  c.train.lr = 1e-4
  with pytest.raises(ConfigError, match="(?s)train.lr: 0.001 in the checkpoint, 0.0001 now.*"
                                        "--allow_config_change"):
    train.train_and_evaluate(c, mine, progress=False)
  # Allowed: it resumes (nothing left to train at the last step).
  out = train.train_and_evaluate(c, mine, progress=False, allow_config_change=True)
  assert int(out["state"]["step"]) == STEPS
  # Safe changes need no flag.
  c = resume_config()
  c.train.log_every, c.train.keep, c.mesh.shape = 7, 2, (1, 1)
  assert int(train.train_and_evaluate(c, mine, progress=False)["state"]["step"]) == STEPS


def test_config_changes_sorts_fields():
  old = json.loads(resume_config().to_json())
  c = resume_config()
  c.train.num_steps, c.loss.w_gan, c.model.embed_dim, c.train.ema_decay = 9, 0.2, 8, 0.999
  d = resume.config_changes(old, c)
  assert [k for k, _, _ in d["safe"]] == ["train.num_steps"]
  assert [k for k, _, _ in d["changes"]] == ["loss.w_gan"]
  assert [k for k, _, _ in d["structural"]] == ["model.embed_dim", "train.ema_decay"]


def test_nan_run_stops_and_keeps_finite_checkpoints(straight, trainer, tmp_path):
  """Adam second moments of -1 (finite) make every update NaN: each is skipped, the run
  stops with a clear error after max_bad_steps, and the checkpoints written before hold
  the untouched finite params (optax alone applies the NaN update after its limit)."""
  mine = str(tmp_path / "w")
  state = trainer.init_state(jax.random.PRNGKey(0))
  opt_g = jax.tree_util.tree_map_with_path(
      lambda p, v: -jnp.ones_like(v) if ".nu" in jax.tree_util.keystr(p) else v, state["opt_g"])
  ck = ckpt_lib.Checkpointer(os.path.join(mine, "checkpoints"), async_save=False)
  ck.save(0, dict(state, opt_g=opt_g), None, resume_config(), force=True)
  ck.close()
  c = resume_config()
  c.train.max_bad_steps = 3   # a safe change on resume
  with pytest.raises(train.TrainingDiverged, match="3 consecutive steps with a non-finite "
                                                   "loss or gradient, up to step 3"):
    train.train_and_evaluate(c, mine, progress=False, trainer=trainer)
  ck = ckpt_lib.Checkpointer(os.path.join(mine, "checkpoints"), async_save=False)
  assert ck.all_steps() == [0, 2]
  init = jax.device_get(state["params"])
  st = jax.device_get(ck.restore(2, trainer.abstract_state))
  _assert_same(st["params"], init)
  ck.close()
  lines = [json.loads(l) for l in open(os.path.join(mine, "metrics.jsonl"))]
  assert [l["skipped"] for l in lines] == [1.0, 1.0, 1.0]
  assert [l["bad_streak"] for l in lines] == [1.0, 2.0, 3.0]


def test_best_checkpoint_ignores_nan_metrics(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), keep=1, keep_best=1, best_metric="loss",
                             async_save=False)
  state = {"w": jnp.arange(3.0)}
  for step, loss in [(1, 1.0), (2, float("nan")), (3, 2.0), (4, float("inf")), (5, 3.0)]:
    ck.save(step, state, metrics={"loss": loss}, force=True)
  ck.wait()
  assert ck.all_steps() == [1, 5]   # the best finite (1) and the latest (5)
  ck.close()


@pytest.mark.slow
def test_killed_during_async_save_resumes_bitwise(straight, trainer, tmp_path):
  """SIGKILL an `hvq train` process while Orbax writes its last checkpoint (step 3) in
  the background: the half-written step is ignored, the next run resumes from step 2
  with the straight run's state at step 2 and ends with its final state."""
  wd, ref = straight
  mine = tmp_path / "w"
  # the CLI runs train_config() itself (a config file), with the saves in the background
  cfg = tmp_path / "train_config.py"
  cfg.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\n"
                 "from tests.conftest import train_config\n\n"
                 "def get_config():\n  c = train_config()\n  c.train.async_checkpoint = True\n"
                 "  return c\n")
  overrides = ["--config", str(cfg)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=os.environ.get(
      "HVQ_TEST_JIT_CACHE", "/tmp/hvq_jax_test_jit_cache"))
  p = subprocess.Popen([sys.executable, "-m", "hvq_jax.cli", "train", "--workdir", str(mine),
                        "--noprogress", *overrides], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
  ckdir = mine / "checkpoints"
  seen = None
  deadline = time.time() + 600
  while time.time() < deadline and p.poll() is None:
    if ckdir.is_dir():
      tmp = [n for n in os.listdir(ckdir) if n.startswith(f"{STEPS}.orbax-checkpoint-tmp")]
      if tmp:
        p.send_signal(signal.SIGKILL)
        seen = tmp[0]
        break
    time.sleep(0.001)
  out = p.communicate()[0].decode()
  assert seen is not None, f"never saw the last save in flight (rc {p.returncode}):\n{out[-2000:]}"
  assert p.returncode == -signal.SIGKILL
  assert str(STEPS) not in os.listdir(ckdir)   # only the temporary folder of the last step
  ck = ckpt_lib.Checkpointer(str(ckdir), async_save=False)
  assert ck.latest_step() == 2
  at2 = jax.device_get(ck.restore(2, trainer.abstract_state))
  ck.close()
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  _assert_same(at2, jax.device_get(ck.restore(2, trainer.abstract_state)))
  ck.close()
  # The config stored by the CLI run differs only in async_checkpoint: a safe change.
  _assert_same(_run(trainer, str(mine)), ref)
  assert not [n for n in os.listdir(ckdir) if "tmp" in n]   # Orbax cleaned it up


def test_nonfinite_step_is_skipped(trainer):
  state = trainer.init_state(jax.random.PRNGKey(0))
  # Poison one codebook entry: the rate and the loss become NaN.
  bad = jax.tree_util.tree_map_with_path(
      lambda p, v: v.at[0].set(jnp.nan) if "embedding" in jax.tree_util.keystr(p) else v,
      state["params"])
  before = jax.device_get(bad)
  batch = np.zeros((2, 64, 64, 3), np.uint8)
  new_state, m = trainer.train_step(dict(state, params=bad), batch)
  assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  _assert_same(jax.device_get(new_state["params"]), before)   # nothing moved (NaN == NaN)


def test_bad_config_values_are_named():
  c = resume_config()
  c.granularity.ratios = (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="sum"):
    train.Trainer(c)
  c = resume_config()
  c.image_size = 72
  with pytest.raises(ValueError, match="image_size"):
    train.Trainer(c)
  c = resume_config()
  c.eval.enabled, c.eval.image_size = True, 64        # before training, not after it
  with pytest.raises(ValueError, match="eval.image_size=64.*161"):
    train.Trainer(c)


@pytest.mark.slow
def test_higher_lambda_gives_lower_bpp(tmp_path):
  bpp = {}
  for lm in (0.05, 5.0):
    c = micro_config()
    c.model.lambda_conditioning = False
    c.rd.lmbda, c.rd.lambdas = lm, (lm,)
    c.train.batch_size, c.train.num_steps, c.train.log_every = 4, 150, 50
    c.train.async_checkpoint = False
    c.eval.image_size = 192
    out = train.train_and_evaluate(c, str(tmp_path / str(lm)), progress=False)
    bpp[lm] = out["eval"][f"{lm:g}"]["bpp"]
  assert bpp[5.0] < 0.8 * bpp[0.05], bpp
