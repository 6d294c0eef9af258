"""A stored config brought up to date once, where it is loaded (configs/upgrade.py)."""
import json
import os
import shutil

import numpy as np
import pytest
import jax

from hvq_jax import codec, images
from hvq_jax.configs import default, upgrade
from hvq_jax.nn import model as model_lib
from tests.conftest import micro_config


def _drop(d, dotted):
  *parents, leaf = dotted.split(".")
  for p in parents:
    d = d[p]
  del d[leaf]


def test_missing_fields_get_the_behaviour_of_the_version_that_wrote_them():
  stored = json.loads(micro_config().to_json())
  for f in ("model.hyperprior.index_bias", "model.hyperprior.index_mixture",
            "model.hyperprior.mask_z", "model.hyperprior.index_bias_scale", "model.rvq_stages"):
    _drop(stored, f)
  del stored["codec"]
  up = upgrade.upgrade(stored)
  # an older model had no bias, no mixture, z everywhere, one VQ stage
  assert (up.model.hyperprior.index_bias, up.model.hyperprior.index_mixture,
          up.model.hyperprior.mask_z, up.model.rvq_stages) == (False, False, False, 1)
  assert up.codec.to_dict() == default.get_config().codec.to_dict()
  assert up.model.ch == micro_config().model.ch          # stored fields are kept
  # the upgraded config builds the model those fields describe: no bias, no mixture
  params = model_lib.init_params(model_lib.build(up.model), jax.random.PRNGKey(0))
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert not any("index_bias" in n or "mix_logit" in n for n in names)
  assert any("index_bias" in n for n in {jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(model_lib.init_params(
                 model_lib.build(micro_config().model), jax.random.PRNGKey(0)))[0]})


def test_a_section_stored_alone_is_upgraded_against_its_defaults():
  m = upgrade.upgrade({"ch": 8, "hyperprior": {"channels": 4}}, "model")
  assert m.ch == 8 and m.hyperprior.channels == 4
  assert m.hyperprior.latent_channels == default.model_config().hyperprior.latent_channels
  assert m.hyperprior.context == "none"
  c = upgrade.upgrade({"z_range": 32}, "codec")
  assert c.z_range == 32 and c.max_pixels == default.get_config().codec.max_pixels
  # an older version's default limit is renewed; one a user chose is kept
  assert upgrade.upgrade({"max_pixels": 4096 * 4096}, "codec").max_pixels == 8192 * 8192
  assert upgrade.upgrade({"max_pixels": 1000}, "codec").max_pixels == 1000


def test_checkpoint_written_before_codec_and_newer_model_fields_loads_and_codes(
    micro_ckpt, tmp_path):
  old = str(tmp_path / "old")
  shutil.copytree(micro_ckpt, old)
  meta = os.path.join(old, "checkpoints", "0", "config", "metadata")
  stored = json.load(open(meta))
  assert stored["model"]["rvq_stages"] == 1 and stored["model"]["hyperprior"]["context"] == "none"
  del stored["codec"], stored["model"]["rvq_stages"], stored["model"]["hyperprior"]["context"]
  del stored["train"]["trainable"], stored["mesh"]
  json.dump(stored, open(meta, "w"))
  # a step saved before checksums existed has no integrity item and does not list one
  step_dir = os.path.join(old, "checkpoints", "0")
  shutil.rmtree(os.path.join(step_dir, "integrity"))
  listing = os.path.join(step_dir, "_CHECKPOINT_METADATA")
  if os.path.exists(listing):
    info = json.load(open(listing))
    (info.get("item_handlers") or {}).pop("integrity", None)
    json.dump(info, open(listing, "w"))
  with pytest.warns(UserWarning, match="no checksums"):
    before = codec.load_model(old)
  now = codec.load_model(micro_ckpt)
  assert before.fingerprint == now.fingerprint
  img = images.bundled_photo("coffee")[:48, :64]
  data = codec.compress(before, img)
  np.testing.assert_array_equal(codec.decompress(now, data), codec.decompress(before, data))
