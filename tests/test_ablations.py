"""Named ablation variants: each builds, trains a step, and round-trips through the codec."""
import numpy as np
import jax
import pytest

from configs import ablations
from hvq_jax import codec, images, sweep, train


def _micro(name):
  c = ablations.get_config(name)
  m = c.model
  m.ch, m.dec_ch, m.norm_groups = 16, 16, 4
  m.hyperprior.channels, m.hyperprior.latent_channels = 16, 4
  if name != "large_codebook":
    m.codebook_size = 64
  c.image_size, c.train.batch_size = 64, 2
  return c


def _one_step_and_round_trip(name):
  c = _micro(name)
  trainer = train.Trainer(c)
  state = trainer.init_state(jax.random.PRNGKey(0))
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


def test_hyperprior_off_codes_with_the_static_histogram():
  cm, img, data = _one_step_and_round_trip("hyperprior_off")
  st = {}
  codec.compress(cm, img, stats=st)
  assert st["bits"]["z"] == 0.0                       # no side information
  b = cm.log_priors["fine"].astype(np.float64)
  lp = b - np.log(np.exp(b - b.max()).sum()) - b.max()
  want = -lp[st["indices"]["fine"]].sum() / np.log(2)
  assert st["bits"]["y_fine"] == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ablations.VARIANTS) - {"hyperprior_off"}))
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
