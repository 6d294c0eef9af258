"""Export and import without PyTorch: safetensors names and layouts, `hvq import` round
trips and its errors, StableHLO. These run whether or not the torch extra is installed
(the PyTorch parity tests are in test_export.py)."""
import numpy as np
import jax
import pytest

from hvq_jax import codec
from hvq_jax import images
from hvq_jax import layout
from hvq_jax.interop import export
from hvq_jax.layout import GRANULARITIES
from tests.conftest import hvq_cli as _cli


def test_flax_torch_names_and_layouts(micro_codec):
  t = export.flax_to_torch(micro_codec.params)
  k = np.asarray(micro_codec.params["encoder"]["conv_in"]["kernel"])        # HWIO
  np.testing.assert_array_equal(t["encoder.conv_in.weight"], k.transpose(3, 2, 0, 1))
  d = np.asarray(micro_codec.params["encoder"]["head_fine"]["film"]["embed"]["kernel"])
  np.testing.assert_array_equal(t["encoder.head_fine.film.embed.weight"], d.T)
  assert "encoder.down0_res0.norm1.weight" in t and "codebook.embedding" in t
  back = export.torch_to_flax(t)
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(micro_codec.params))[0],
                       jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))


def test_import_round_trip_identical(micro_codec, exported, tmp_path):
  r = _cli("import", "--from", "torch", "--checkpoint", exported, "--out", str(tmp_path / "imp"))
  assert r.returncode == 0, r.stderr
  back = codec.load_model(str(tmp_path / "imp"))
  for a, b in zip(jax.tree.leaves(jax.device_get(micro_codec.params)),
                  jax.tree.leaves(jax.device_get(back.params))):
    np.testing.assert_array_equal(a, b)
  assert back.fingerprint == micro_codec.fingerprint   # same params and config


def test_import_reports_bad_files(tmp_path, exported):
  from safetensors.numpy import load_file, save_file
  t = load_file(exported)
  t.pop("codebook.embedding")
  t["extra.weight"] = np.zeros(3, np.float32)
  bad = str(tmp_path / "bad.safetensors")
  from safetensors import safe_open
  with safe_open(exported, "np") as f:
    meta = f.metadata()
  save_file(t, bad, metadata=meta)
  r = _cli("import", "--checkpoint", bad, "--out", str(tmp_path / "o"))
  assert r.returncode != 0 and "missing keys" in r.stderr and "codebook" in r.stderr
  assert "unexpected keys" in r.stderr and "Traceback" not in r.stderr
  (tmp_path / "junk.safetensors").write_bytes(b"not a file")
  r = _cli("import", "--checkpoint", str(tmp_path / "junk.safetensors"), "--out", str(tmp_path / "o2"))
  assert r.returncode != 0 and "not a safetensors file" in r.stderr


def test_stablehlo_round_trip(micro_codec, tmp_path):
  paths = export.export_stablehlo(micro_codec, str(tmp_path), 64, 80)
  enc, dec = export.load_stablehlo(paths["encoder"]), export.load_stablehlo(paths["decoder"])
  img = images.bundled_photo("coffee")[:64, :80]
  gmap, idx = enc(img[None], np.full((1,), micro_codec.default_lmbda, np.float32),
                  np.asarray(micro_codec.default_ratios, np.float32))
  out = np.asarray(dec(gmap, *idx))[0]
  data = codec.compress(micro_codec, img, colour=False)   # the networks' pixels alone
  _, ref_idx, ref_gmap = codec.decode_indices(micro_codec, data)
  np.testing.assert_array_equal(np.asarray(gmap), ref_gmap)
  from hvq_jax.nn import model as model_lib
  masks = layout.sent_masks(ref_gmap, tuple(micro_codec.cfg.strides))
  for g, i in zip(GRANULARITIES, idx):
    m = np.asarray(masks[g])
    np.testing.assert_array_equal(np.asarray(i)[m], ref_idx[g][m])
  # params are baked in as constants, which XLA folds differently: rounding-level only
  ref = codec.decompress(micro_codec, data)
  assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
