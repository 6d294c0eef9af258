"""The staged recipe (training/phases.py): tokenizer on its static code, then the prior alone
on the frozen tokenizer; the phase follows the step, so resumes continue it exactly."""
import json
import os
import shutil

import numpy as np
import jax
import optax
import pytest

from hvq_jax import checkpoint as ckpt_lib
from hvq_jax.configs import tiny_cpu
from hvq_jax.nn.model import ConfigError
from hvq_jax.training import optim, phases, train
from hvq_jax.training.trainer import Trainer
from tests.conftest import micro_config

STEPS = 4   # tokenizer 0-2, prior 2-4


def staged_config():
  c = micro_config()
  c.train.recipe, c.train.prior_fraction = "staged", 0.5
  c.image_size, c.train.batch_size, c.train.num_steps = 64, 2, STEPS
  c.train.log_every, c.train.ckpt_every, c.train.keep = 1, 2, 10
  c.train.async_checkpoint, c.train.warmup_steps = False, 1
  c.eval.enabled = False
  return c


def test_plan_of_each_recipe():
  c = tiny_cpu.get_config()
  c.train.num_steps = 1000
  c.train.prior_fraction = 0.3
  assert [(p.name, p.start, p.end) for p in phases.plan(c)] == [
      ("tokenizer", 0, 700), ("prior", 700, 1000)]
  c.train.finetune_fraction = 0.1
  assert [(p.name, p.start, p.end) for p in phases.plan(c)] == [
      ("tokenizer", 0, 600), ("prior", 600, 900), ("joint", 900, 1000)]
  assert [p.lr for p in phases.plan(c)] == [c.train.lr, c.train.prior_lr, c.train.finetune_lr]
  c.train.recipe = "joint"
  assert [(p.name, p.start, p.end) for p in phases.plan(c)] == [("joint", 0, 1000)]
  c.train.recipe, c.model.hyperprior.enabled = "staged", False
  assert [(p.name, p.end) for p in phases.plan(c)] == [("tokenizer", 1000)]
  c.model.hyperprior.enabled, c.train.trainable = True, "prior"
  assert [(p.name, p.end) for p in phases.plan(c)] == [("prior", 1000)]
  c.train.trainable, c.train.num_steps = "all", 0
  assert [(p.name, p.end) for p in phases.plan(c)] == [("tokenizer", 0)]


@pytest.mark.parametrize("field,value,match", [
    ("train.recipe", "alternating", "recipe"),
    ("train.prior_fraction", 1.0, "prior_fraction"),
    ("model.hyperprior.index_bias", False, "index_bias")])
def test_impossible_recipes_are_config_errors(field, value, match):
  c = staged_config()
  section, name = field.rsplit(".", 1)
  c_section = c
  for part in section.split("."):
    c_section = c_section[part]
  c_section[name] = value
  with pytest.raises(ConfigError, match=match):
    Trainer(c)


def test_schedule_restarts_each_phase():
  c = staged_config()
  c.train.num_steps, c.train.warmup_steps, c.train.prior_fraction = 40, 8, 0.5
  ps = phases.plan(c)
  sched = optim.schedule(c.train, ps)
  tc = c.train
  # independent reference: optax's warmup-cosine of each phase, shifted to its start
  first = optax.warmup_cosine_decay_schedule(0.0, tc.lr, 8, 20, tc.lr * tc.final_lr_frac)
  second = optax.warmup_cosine_decay_schedule(0.0, tc.prior_lr, 5, 20,
                                              tc.prior_lr * tc.final_lr_frac)  # 20 // 4
  for n in (0, 3, 8, 19):
    np.testing.assert_allclose(sched(n), first(n), rtol=1e-6)
  for n in (20, 22, 25, 39):
    np.testing.assert_allclose(sched(n), second(n - 20), rtol=1e-6)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
  c = staged_config()
  trainer = Trainer(c)
  wd = str(tmp_path_factory.mktemp("staged"))
  state = jax.device_get(train.train_and_evaluate(c, wd, progress=False, trainer=trainer)["state"])
  return trainer, wd, state


def _state_at(trainer, wd, step):
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  try:
    return jax.device_get(ck.restore(step, trainer.abstract_state))
  finally:
    ck.close()


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_each_phase_trains_what_it_says(staged_run):
  trainer, wd, final = staged_run
  s0, s2 = (_leaves(_state_at(trainer, wd, s)["params"]) for s in (0, 2))
  s4 = _leaves(final["params"])
  prior = {k for k in s0 if k.startswith("['hyper_")}
  bias = {k for k in prior if "index_bias" in k}
  tokenizer = set(s0) - prior
  assert bias and tokenizer
  moved = lambda a, b, keys: {k for k in keys if not np.array_equal(a[k], b[k])}
  # tokenizer phase: the tokenizer and the static code move, the rest of the prior not
  assert moved(s0, s2, bias) == bias and len(moved(s0, s2, tokenizer)) > len(tokenizer) // 2
  assert moved(s0, s2, prior - bias) == set()
  # prior phase: the tokenizer is frozen bit for bit, the hyperprior trains
  assert moved(s2, s4, tokenizer) == set()
  assert len(moved(s2, s4, prior - bias)) > len(prior - bias) // 2
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [l["phase"] for l in lines] == [0, 0, 1, 1]
  assert all(l["bpp_z"] == 0 for l in lines[:2]) and all(l["bpp_z"] > 0 for l in lines[2:])


def test_prior_phase_holds_the_tokenizers_optimiser_state(staged_run):
  """Adam's moments and step count of the tokenizer group do not move while it is frozen,
  so a later joint phase continues its schedule where the tokenizer phase left it."""
  trainer, wd, final = staged_run
  groups = lambda st: st["opt_g"].inner_state[1].inner_states
  tok2 = _leaves(groups(_state_at(trainer, wd, 2))["tokenizer"])
  tok4 = _leaves(groups(final)["tokenizer"])
  assert tok2.keys() == tok4.keys() and len(tok2) > 2
  for k in tok2:
    np.testing.assert_array_equal(tok2[k], tok4[k], err_msg=k)


def test_resume_at_the_phase_boundary_is_bitwise_exact(staged_run, tmp_path):
  trainer, wd, final = staged_run
  mine = str(tmp_path / "w")
  os.makedirs(os.path.join(mine, "checkpoints"))
  for s in (0, 2):
    shutil.copytree(os.path.join(wd, "checkpoints", str(s)),
                    os.path.join(mine, "checkpoints", str(s)))
  out = jax.device_get(train.train_and_evaluate(staged_config(), mine, progress=False,
                                                trainer=trainer)["state"])
  a, b = _leaves(out), _leaves(final)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_moving_the_phases_on_resume_needs_allow_config_change(staged_run, tmp_path):
  _, wd, _ = staged_run
  mine = str(tmp_path / "w")
  shutil.copytree(wd, mine)
  c = staged_config()
  c.train.num_steps = 8          # the prior phase would start at step 4, not 2
  with pytest.raises(ConfigError, match="train phases"):
    train.train_and_evaluate(c, mine, progress=False)


def test_training_draws_its_ratios_from_train_ratios():
  c = staged_config()
  c.granularity.train_ratios = ((0.0, 0.2, 0.8), (0.9, 0.1, 0.0), (0.3, 0.4, 0.3))
  t = Trainer(c)
  drawn = {tuple(np.round(np.asarray(t.sample_ratios(jax.random.PRNGKey(i))), 6))
           for i in range(40)}
  assert drawn == {tuple(np.float32(v) for v in r) for r in c.granularity.train_ratios}
  c.granularity.train_ratios = ()
  np.testing.assert_array_equal(Trainer(c).sample_ratios(jax.random.PRNGKey(0)),
                                np.float32(c.granularity.ratios))
  c.granularity.train_ratios = ((0.5, 0.6, 0.1),)
  with pytest.raises(ConfigError, match="ratios"):
    Trainer(c)
