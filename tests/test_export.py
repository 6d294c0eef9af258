"""PyTorch model parity and decoding: the tests that need torch (the torch-free
export/import/StableHLO tests are in test_export_numpy.py, the taming and Control-GIC
imports in test_taming_import.py)."""
import os
import subprocess
import sys

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")   # the `torch` extra; .ci/run installs torch==2.13.0

from hvq_jax import codec
from hvq_jax import colour
from hvq_jax.entropy import bitstream
from hvq_jax.interop import export
from hvq_jax import images
from hvq_jax.training import train  # noqa: E402
from hvq_jax import layout
from hvq_jax.layout import GRANULARITIES  # noqa: E402


def _cli(*a):
  return subprocess.run([sys.executable, "-m", "hvq_jax.cli", *a], capture_output=True, text=True)


@pytest.mark.parametrize("name,crop", [("coffee", (slice(0, 64), slice(0, 80))),
                                       pytest.param("chelsea", (slice(0, 45), slice(0, 71)),
                                                    marks=pytest.mark.slow)])   # odd size: a recompile
def test_torch_model_matches_jax(micro_codec, exported, name, crop):
  from hvq_jax.interop.torch_model import from_safetensors
  net = from_safetensors(exported)
  img = images.bundled_photo(name)[crop]
  x = img.astype(np.float32)[None] / 127.5 - 1.0
  cm = micro_codec
  ref = jax.device_get(jax.jit(cm.model.apply)({"params": cm.params}, jnp.asarray(x),
                                      jnp.full((1,), cm.default_lmbda),
                                      jnp.asarray(cm.default_ratios, jnp.float32)))
  out = net(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(out["gmap"].numpy(), ref["gmap"])
  for g in GRANULARITIES:
    np.testing.assert_array_equal(out["indices"][g].numpy(), ref["indices"][g])
  recon = out["recon"].permute(0, 2, 3, 1).numpy()
  scale = np.abs(ref["recon"]).max()
  assert np.abs(recon - ref["recon"]).max() <= 1e-4 * scale
  for k, v in ref["bits"].items():
    np.testing.assert_allclose(out["bits"][k].numpy(), v, rtol=1e-4, atol=1e-3, err_msg=k)
  np.testing.assert_allclose(out["bpp"].numpy(), ref["bpp"], rtol=1e-4)


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) for v in
                                     ("residual_vq", "hyperprior_off", "per_granularity_codebook")]
                         + ["residual_vq_hyperprior_off"])   # the cheapest covers both ablations
def test_torch_model_matches_jax_on_ablation_tokenizers(variant, tmp_path):
  """Residual VQ (codebook per stage, residual off the sphere) and the static-histogram
  prior: same branch keys, indices and bits in PyTorch."""
  from hvq_jax.configs import ablations
  from hvq_jax.nn import model as model_lib
  from hvq_jax.interop.torch_model import from_safetensors
  c = ablations.get_config(variant)
  m = c.model
  m.ch, m.dec_ch, m.norm_groups, m.codebook_size = 16, 16, 4, 64
  m.hyperprior.channels, m.hyperprior.latent_channels = 16, 4
  mdl = model_lib.build(m)
  params = model_lib.init_params(mdl, jax.random.PRNGKey(0))
  # a non-trivial static histogram, so its bits are not all log2 K
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.05 * jnp.sin(jnp.arange(v.size, dtype=v.dtype)).reshape(v.shape)
      if "index_bias" in jax.tree_util.keystr(p) else v, params)
  path = str(tmp_path / "m.safetensors")
  export.save_torch(params, c, path)
  net = from_safetensors(path)
  x = images.bundled_photo("rocket")[:48, :80].astype(np.float32)[None] / 127.5 - 1.0
  ref = jax.device_get(jax.jit(mdl.apply)({"params": params}, jnp.asarray(x), jnp.full((1,), 0.2),
                                 jnp.asarray([0.2, 0.3, 0.5], jnp.float32)))
  out = net(torch.from_numpy(x).permute(0, 3, 1, 2), 0.2, (0.2, 0.3, 0.5))
  assert sorted(out["indices"]) == sorted(ref["indices"])
  assert len(ref["indices"]) == 3 * m.get("rvq_stages", 1)
  for k, v in ref["indices"].items():
    np.testing.assert_array_equal(out["indices"][k].numpy(), v, err_msg=k)
  scale = np.abs(ref["recon"]).max()
  assert np.abs(out["recon"].permute(0, 2, 3, 1).numpy() - ref["recon"]).max() <= 1e-4 * scale
  for k, v in ref["bits"].items():
    np.testing.assert_allclose(out["bits"][k].numpy(), v, rtol=1e-4, atol=1e-3, err_msg=k)


def test_torch_decodes_jax_files(micro_codec, exported, tmp_path):
  """A .hvq file made by the JAX codec decodes in PyTorch: the stored integer tables are
  the JAX model's, the symbols are identical, the pixels within 1/255."""
  from hvq_jax.entropy import streams
  from hvq_jax.interop import torch_model
  tables, fp, codec_cfg = export.load_coding(exported)
  assert fp == micro_codec.fingerprint and set(tables) == set(micro_codec.tables)
  for k, t in tables.items():
    ref = micro_codec.tables[k].arrays()
    got = t.arrays()
    assert sorted(got) == sorted(ref)
    for name in ref:
      np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{k}.{name}")
  net = torch_model.from_safetensors(exported)
  for name, crop in [("coffee", (slice(0, 64), slice(0, 80))), ("chelsea", (slice(0, 45), slice(3, 74)))]:
    img = images.bundled_photo(name)[crop]
    data = codec.compress(micro_codec, img)
    header, payload, hw = streams.read_header(data, fp, net.cfg, codec_cfg["max_pixels"])
    gmap, idx = streams.decode(tables, net.cfg, codec_cfg["z_range"], header, payload, hw)
    _, ref_idx, ref_gmap = codec.decode_indices(micro_codec, data)
    np.testing.assert_array_equal(gmap, ref_gmap)
    for k in ref_idx:
      np.testing.assert_array_equal(idx[k], ref_idx[k])
    out = torch_model.decompress(net, data)
    ref = codec.decompress(micro_codec, data)
    assert out.shape == img.shape and out.dtype == np.uint8
    # networks within a level; the file's colour transform may scale that (colour.bound)
    tol = colour.bound(bitstream.unpack(data)[0].colour)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= tol
  (tmp_path / "a.hvq").write_bytes(data)
  r = _cli("decompress", str(tmp_path / "a.hvq"), "-o", str(tmp_path / "a.png"),
           "--checkpoint", exported, "--backend", "torch")
  assert r.returncode == 0, r.stderr
  from PIL import Image
  assert np.abs(np.asarray(Image.open(tmp_path / "a.png")).astype(int) - ref.astype(int)).max() <= tol
  from hvq_jax.entropy.bitstream import CONTAINER_BYTES as CONTAINER
  with pytest.raises(codec.BitstreamError, match="symbol digest|cannot be decoded"):
    body = bytearray(data[:-4])
    body[CONTAINER + (len(body) - CONTAINER) // 2] ^= 0xFF
    import struct, zlib
    torch_model.decompress(net, bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))


def test_export_without_tables_cannot_decode(micro_codec, tmp_path):
  from hvq_jax.interop import torch_model
  path = str(tmp_path / "bare.safetensors")
  export.save_torch(micro_codec.params, micro_codec.config, path)
  net = torch_model.from_safetensors(path)
  with pytest.raises(export.ExportError, match="no coding tables"):
    torch_model.decompress(net, codec.compress(micro_codec, images.bundled_photo("coffee")[:32, :32]))
