"""Named ablation variants: each builds, trains a step, and round-trips through the codec."""
import os

import numpy as np
import jax
import pytest

from hvq_jax.configs import ablations
from hvq_jax import codec, layout
from hvq_jax.codec import profile
from hvq_jax import images
from hvq_jax.evaluation import sweep
from hvq_jax.training import train
from hvq_jax.nn import model as model_lib


def _micro(name):
  c = ablations.get_config(name)
  m = c.model
  m.ch, m.dec_ch, m.norm_groups = 16, 16, 4
  m.hyperprior.channels, m.hyperprior.latent_channels = 16, 4
  if name != "large_codebook":
    m.codebook_size = 64
  c.image_size, c.train.batch_size = 64, 2
  return c


def _one_step_and_round_trip(name, step=True):
  c = _micro(name)
  trainer = train.Trainer(c)
  state = trainer.init_state(jax.random.PRNGKey(0))
  if step:   # the train step's compile is most of the cost: the slow variant test pays it
    batch = np.stack([images.bundled_photo("astronaut")[:64, :64],
                      images.bundled_photo("rocket")[:64, :64]])
    state, m = trainer.train_step(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["skipped"]) == 0.0
  cm = codec.CodecModel(c, train.host_params(trainer, state["params"]))
  img = images.bundled_photo("coffee")[:48, :80]
  data = codec.compress(cm, img)
  out = codec.decompress(cm, data)
  assert out.shape == img.shape
  return cm, img, data


@pytest.mark.slow   # the plug-in test codes with a hyperprior-off model in the fast suite
def test_hyperprior_off_codes_with_the_static_histogram():
  cm, img, data = _one_step_and_round_trip("hyperprior_off")
  _, st = profile.compress(cm, img)
  assert st["bits"]["z"] == 0.0                       # no side information
  # the integer static table approximates softmax(learned logits) (float64 reference)...
  b = np.asarray(cm.params["static_fine"]["index_bias"], np.float64) * \
      cm.cfg.hyperprior.get("index_bias_scale", 1.0)
  lp = b - np.log(np.exp(b - b.max()).sum()) - b.max()
  want = -lp[st["indices"]["fine"]].sum() / np.log(2)
  assert st["bits"]["y_fine"] == pytest.approx(want, rel=5e-3)
  # ...and the file's bits are exactly -log2((w + 1) / 2^24) of its integer weights
  w = cm.tables["fine"].static.astype(np.int64)
  assert w.sum() == 2 ** 24 - w.size
  exact = np.sum(24 - np.log2(w[st["indices"]["fine"]] + 1.0))
  assert st["bits"]["y_fine"] == pytest.approx(exact, rel=1e-12)


def _entries(cm, key):
  entries = jax.jit(lambda p: cm.model.apply(p, key, method=model_lib.HVQ.codebook_entries))
  return np.asarray(entries({"params": cm.params}), np.float64)


def _normalize(v):
  return v / np.sqrt((v * v).sum(-1, keepdims=True) + 1e-6)


@pytest.mark.slow   # about a minute of compiles; the fast suite keeps the parts
def test_residual_vq_codes_every_stage():
  """Stage 1 quantises what stage 0 left (numpy argmin), both stages' streams round-trip,
  and the decoder sees the sum of the two entries."""
  cm, img, data = _one_step_and_round_trip("residual_vq", step=False)
  assert [b for b, _, _ in cm.branches] == ["coarse", "coarse_s1", "medium", "medium_s1",
                                            "fine", "fine_s1"]
  lat = codec.encode_latents(cm, img, cm.default_lmbda, cm.default_ratios)
  xp = codec.pad_image(img, cm.cfg.strides[0])[None].astype(np.float32) / 127.5 - 1.0
  analyze = jax.jit(lambda p, *a: cm.model.apply(p, *a, method=model_lib.HVQ.analyze))
  a = jax.device_get(analyze({"params": cm.params}, xp, np.full((1,), cm.default_lmbda),
                             np.asarray(cm.default_ratios, np.float32)))
  for g in ("coarse", "medium", "fine"):
    y = _normalize(np.asarray(a["y"][g], np.float64))
    e0, e1 = (_entries(cm, k) for k in (g, f"{g}_s1"))
    i0 = ((y[..., None, :] - e0) ** 2).sum(-1).argmin(-1)
    r = y - e0[i0]
    i1 = ((r[..., None, :] - e1) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(lat["indices"][g], i0)
    np.testing.assert_array_equal(lat["indices"][f"{g}_s1"], i1)
    assert np.linalg.norm(r - e1[i1], axis=-1).mean() < np.linalg.norm(r, axis=-1).mean()
  _, dec_idx, gmap = codec.decode_indices(cm, data)
  masks = layout.sent_masks(gmap, tuple(cm.cfg.strides))
  for b, g, _ in cm.branches:
    np.testing.assert_array_equal(dec_idx[b][masks[g]], lat["indices"][b][masks[g]])
  _, st = profile.compress(cm, img)
  assert set(st["indices"]) == {b for b, g, _ in cm.branches if st["counts"]["cmf".index(g[0])]}
  # decoding the two stages' sum equals decoding from the summed entries by hand
  q = {g: 0.0 for g in ("coarse", "medium", "fine")}
  for b, g, _ in cm.branches:
    q[g] = q[g] + _entries(cm, b)[dec_idx[b]]
  hw = xp.shape[1:3]
  run = lambda method: jax.jit(lambda p, a, m: cm.model.apply(p, a, m, hw, method=method))
  want = run(model_lib.HVQ.synthesize)({"params": cm.params}, q, gmap)
  got = run(model_lib.HVQ.decode_latents)({"params": cm.params}, dec_idx, gmap)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ablations.VARIANTS) - {"hyperprior_off", "residual_vq"}))
def test_variant_trains_and_round_trips(name):
  _one_step_and_round_trip(name)


def test_unknown_variant_and_grid():
  with pytest.raises(ValueError, match="unknown ablation"):
    ablations.get_config("nope")
  runs = sweep.expand_grid("model.codebook_size=512,1024 rd.lambdas=(0.1,0.2),(0.5,)")
  assert len(runs) == 4 and runs[1] == {"model.codebook_size": "512", "rd.lambdas": "(0.5,)"}
  plan = sweep.plan("configs/ablations.py", "W", ["base", "single_scale"], "train.num_steps=5", [])
  assert [p[0] for p in plan] == ["W/base__num_steps=5", "W/single_scale__num_steps=5"]
  assert "--config.train.num_steps=5" in plan[0][1] and plan[1][1][2] == "configs/ablations.py:single_scale"


def test_sweep_plug_in_runs_follow_hyperprior_off_runs():
  plan = sweep.plan("configs/ablations.py", "W", ["base", "hyperprior_off"], "", [], plug_in=True,
                    plug_in_steps=7)
  assert [p[0] for p in plan] == ["W/base", "W/hyperprior_off", "W/hyperprior_off__plug_in"]
  t = plan[2][1]
  assert t[t.index("--workdir") + 1] == "W/hyperprior_off__plug_in"
  for flag in ("--config.model.hyperprior.enabled=True", "--config.train.init_from=W/hyperprior_off",
               "--config.train.trainable=prior", "--config.train.num_steps=7"):
    assert flag in t
  grid = sweep.plan("configs/tiny_cpu.py", "W", [], "model.hyperprior.enabled=True,False", [],
                    plug_in=True)
  assert [p[0] for p in grid][-1] == "W/enabled=False__plug_in" and len(grid) == 3
  ctx = sweep.plan("configs/ablations.py", "W", ["hyperprior_off"], "", [], plug_in=True,
                   plug_in_set=["model.hyperprior.context=coarser"])
  assert "--config.model.hyperprior.context=coarser" in ctx[1][1]
  assert not any("context" in a for a in ctx[0][1])


def test_sweep_collects_tables(tmp_path):
  """collect() reads each run's eval/summary.json into table.* and branches.*."""
  import csv
  import json
  for run, saving in (("base", 0.06), ("residual_vq", -0.17)):
    os.makedirs(tmp_path / run / "eval")
    s = dict(hyperprior_saving_vs_static=saving,
             saving_vs_static_per_setting={"lmbda=0.2": saving},
             curves={"hvq": [dict(setting="lmbda=0.2", bpp=0.25, psnr=21.0, ms_ssim=0.8, lpips=None)]},
             per_branch_bits_per_index={"fine": dict(indices=10, hyperprior_y=5.0, z=0.5, static=6.0,
                                                     saving_vs_static=1 - 5.5 / 6.0)})
    (tmp_path / run / "eval" / "summary.json").write_text(json.dumps(s))
  rows = sweep.collect(str(tmp_path), [str(tmp_path / "base"), str(tmp_path / "residual_vq"),
                                       str(tmp_path / "missing")])
  assert [r["run"] for r in rows] == ["base", "residual_vq"]
  with open(tmp_path / "branches.csv") as f:
    br = list(csv.DictReader(f))
  assert [(r["run"], r["branch"]) for r in br] == [("base", "fine"), ("residual_vq", "fine")]
  assert float(br[0]["saving_vs_static"]) == pytest.approx(1 / 12)
  md = (tmp_path / "table.md").read_text().splitlines()
  assert md[0].startswith("| run | setting") and "-0.1700" in md[3]


def test_sweep_compare_pairs():
  """Pareto counts, BD-rate and the same-pixel bits ratio, against hand-worked numbers."""
  pts = lambda run, bp: [dict(run=run, setting=f"s{i}", bpp=b, psnr=p) for i, (b, p) in enumerate(bp)]
  off = pts("off", [(0.30, 22.0), (0.30, 22.0)])               # no lambda conditioning
  plug = pts("plug", [(0.24, 22.0), (0.27, 22.0)])             # same pixels, fewer bits
  joint = pts("joint", [(0.20, 21.0), (0.25, 21.5)])
  pairs = {(r["run_a"], r["run_b"]): r for r in sweep.compare(off + plug + joint)}
  r = pairs[("off", "plug")]
  assert r["same_pixels"] and r["bits_ratio_b_over_a"] == pytest.approx((0.8 + 0.9) / 2)
  assert r["a_points_dominated_by_b"] == "2/2" and r["b_points_dominated_by_a"] == "0/2"
  assert r["bd_rate_psnr_b_vs_a"] is None                      # no PSNR interval to share
  r = pairs[("plug", "joint")]
  assert not r["same_pixels"] and r["a_points_dominated_by_b"] == "0/2"
  assert r["b_points_dominated_by_a"] == "1/2"                 # (0.25, 21.5) by (0.24, 22.0)
  two = pts("a", [(0.2, 20.0), (0.4, 22.0)]) + pts("b", [(0.1, 20.0), (0.2, 22.0)])
  bd = sweep.compare(two)[0]["bd_rate_psnr_b_vs_a"]
  assert bd == pytest.approx(-50.0)                            # half the rate at every PSNR


def test_sweep_skips_a_plug_in_whose_tokenizer_failed(tmp_path, monkeypatch):
  calls = []

  def fake_run(argv, *a, **k):
    calls.append(argv)
    return type("R", (), {"returncode": int(argv[3] == "train" and argv[
        argv.index("--workdir") + 1].endswith("hyperprior_off"))})()

  monkeypatch.setattr(sweep.subprocess, "run", fake_run)
  rc = sweep.main(["--config", "configs/ablations.py", "--workdir", str(tmp_path),
                   "--variants", "hyperprior_off", "--plug-in"])
  assert rc == 1 and len(calls) == 1 and calls[0][3] == "train"   # no eval, no plug-in run


def test_staged_long_trains_its_tokenizer_as_long_as_hyperprior_off():
  from hvq_jax.training import phases
  base, off, long = (phases.plan(ablations.get_config(n))
                     for n in ("base", "hyperprior_off", "staged_long"))
  assert [p.name for p in long] == ["tokenizer", "prior"]
  assert long[0].steps == off[0].steps
  assert long[1].steps == base[1].steps and long[1].lr == base[1].lr
  assert ablations.get_config("staged_long").model.hyperprior.spatial == "checkerboard"


def test_hyperprior_off_and_joint_train_as_long_as_the_staged_base():
  """Equal training time: the base's tokenizer steps plus half its prior steps (a prior step
  costs about half a tokenizer step), one phase each."""
  from hvq_jax.training import phases
  base = phases.plan(ablations.get_config("base"))
  assert [p.name for p in base] == ["tokenizer", "prior"]
  for name, phase in (("hyperprior_off", "tokenizer"), ("joint", "joint")):
    plan = phases.plan(ablations.get_config(name))
    assert [(p.name, p.steps) for p in plan] == [(phase, base[0].steps + base[1].steps // 2)]


def test_recipe_study_steps_keep_staged_long_equal_to_hyperprior_off():
  """`recipe_study --steps N`: the overrides it passes give staged_long as many tokenizer
  steps as the hyperprior-off run (a base of N steps' equal-time budget) and the prior phase
  of a base run of N steps."""
  import ml_collections
  from hvq_jax.training import phases
  from benchmarks import recipe_study

  def planned(name, n):
    c = ablations.get_config(name)
    for o in recipe_study._steps_overrides(name, n):
      key, value = o[len("--config."):].split("=")
      node = c
      for k in key.split(".")[:-1]:
        node = node[k]
      leaf = key.split(".")[-1]
      node[leaf] = type(node[leaf])(float(value) if "." in value else int(value))
    assert isinstance(c, ml_collections.ConfigDict)
    return phases.plan(c)

  for n in (100, 333):
    long, off, base = (planned(r, n) for r in ("staged_long", "hyperprior_off", "base"))
    p = round(n * ablations.get_config("base").train.prior_fraction)
    assert base[0].steps == n - p and long[1].steps == base[1].steps == p
    assert long[0].steps == off[0].steps == n - p + p // 2


def test_staged_long_quad_has_staged_longs_tokenizer_phase_and_three_times_the_prior_phase():
  from hvq_jax.training import phases
  base, long, quad = (phases.plan(ablations.get_config(n))
                      for n in ("base", "staged_long", "staged_long_quad"))
  assert [p.name for p in quad] == [p.name for p in base] == ["tokenizer", "prior"]
  assert quad[0].steps == long[0].steps
  assert quad[1].steps == 3 * base[1].steps and quad[1].lr == base[1].lr
  assert ablations.get_config("staged_long_quad").model.hyperprior.spatial == "quad"
