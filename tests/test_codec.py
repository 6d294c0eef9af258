"""The real codec: round trip against the model's forward, file size vs estimate, bad input."""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from hvq_jax.entropy import bitstream
from hvq_jax import codec
from hvq_jax import colour
from hvq_jax import images
from hvq_jax.training import train
from hvq_jax.training import heldout
from hvq_jax.entropy.bitstream import BitstreamError
from hvq_jax.layout import GRANULARITIES
from tests.conftest import make_workdir


@pytest.fixture(scope="module")
def ckpt_dir(micro_ckpt):
  return micro_ckpt


@pytest.fixture(scope="module")
def cmodel(micro_codec):
  return micro_codec


@pytest.fixture(scope="module")
def photo():
  return images.bundled_photo("coffee")[100:164, 200:277]   # 64x77: odd width


@pytest.fixture(scope="module")
def encoded(cmodel, photo):
  return codec.compress(cmodel, photo)


def _forward(cmodel, img, lmbda, ratios):
  """The model's own eval-mode forward on the same padded input."""
  m = cmodel.cfg.strides[0]
  xp = np.pad(img, ((0, (-img.shape[0]) % m), (0, (-img.shape[1]) % m), (0, 0)), mode="edge")
  recon, bpp, idx, masks = jax.device_get(heldout.eval_forward(
      cmodel.model, cmodel.params, xp[None], lmbda, jnp.asarray(ratios, jnp.float32)))
  return recon[0, :img.shape[0], :img.shape[1]], bpp[0] * xp.shape[0] * xp.shape[1], idx, masks


@pytest.mark.parametrize("name,crop", [
    ("coffee", (slice(100, 164), slice(200, 277))),   # 64x77
    ("coffee", (slice(0, 37), slice(0, 53))),         # 37x53: smaller than one stride multiple
    ("chelsea", (slice(None), slice(None))),          # 300x451: the whole photo
])
def test_round_trip_matches_forward(cmodel, name, crop):
  img = images.bundled_photo(name)[crop]
  data = codec.compress(cmodel, img, colour=False)   # the networks' path alone
  assert bitstream.unpack(data)[0].colour == colour.IDENTITY
  out = codec.decompress(cmodel, data)
  assert out.shape == img.shape and out.dtype == np.uint8
  recon, bits, idx, masks = _forward(cmodel, img, cmodel.default_lmbda, cmodel.default_ratios)
  assert np.abs(out.astype(int) - recon.astype(int)).max() <= 1
  _, dec_idx, _ = codec.decode_indices(cmodel, data)
  for g in GRANULARITIES:   # the same indices at every sent position
    m = np.asarray(masks[g])
    np.testing.assert_array_equal(dec_idx[g][m], np.asarray(idx[g])[m])


def test_file_size_close_to_estimate(cmodel, photo, encoded):
  recon, bits, _, _ = _forward(cmodel, photo, cmodel.default_lmbda, cmodel.default_ratios)
  header, payload = bitstream.unpack(encoded)
  payload_bytes = 4 * payload.size
  est_bytes = float(bits) / 8
  assert abs(payload_bytes - est_bytes) <= 0.01 * est_bytes + 64, (payload_bytes, est_bytes)


def test_ratios_and_lambda_in_header(cmodel, photo):
  data = codec.compress(cmodel, photo, lmbda=0.7, ratios=(1.0, 0.0, 0.0), colour=False)
  header, _ = bitstream.unpack(data)
  assert header.lmbda == pytest.approx(0.7)
  assert header.counts[1:] == (0, 0)
  out = codec.decompress(cmodel, data)
  recon, _, _, _ = _forward(cmodel, photo, 0.7, (1.0, 0.0, 0.0))
  assert np.abs(out.astype(int) - recon.astype(int)).max() <= 1


def test_decoding_is_independent_of_process(ckpt_dir, encoded, cmodel, photo):
  script = ("import sys, numpy as np; from hvq_jax import codec; "
            "m = codec.load_model(sys.argv[1]); "
            "sys.stdout.buffer.write(codec.decompress(m, open(sys.argv[2], 'rb').read()).tobytes())")
  path = os.path.join(ckpt_dir, "x.hvq")
  with open(path, "wb") as f:
    f.write(encoded)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run([sys.executable, "-c", script, ckpt_dir, path], capture_output=True,
                       env=env, check=True).stdout
  np.testing.assert_array_equal(np.frombuffer(out, np.uint8).reshape(photo.shape),
                                codec.decompress(cmodel, encoded))


def _with_crc(body: bytes) -> bytes:
  return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d[:10], "truncated"),
    (lambda d: d[:-9], "truncated"),
    (lambda d: b"JUNK" + d[4:], "magic"),
    (lambda d: d[:100] + bytes([d[100] ^ 0x10]) + d[101:], "checksum"),
    (lambda d: _with_crc(d[:4] + bytes([9]) + d[5:-4]), "version"),
    (lambda d: d + b"\0", "trailing"),
    (lambda d: b"", "magic"),
])
def test_bad_bitstreams_rejected(cmodel, encoded, mutate, match):
  with pytest.raises(BitstreamError, match=match):
    codec.decompress(cmodel, mutate(encoded))


def test_wrong_model_rejected(tmp_path_factory, encoded):
  other = codec.load_model(make_workdir(tmp_path_factory, "other_model", 1))
  with pytest.raises(BitstreamError, match="different model"):
    codec.decompress(other, encoded)


def test_forged_header_counts_rejected(cmodel, encoded):
  fmt = "<4sB8sIIf3I8sI"
  fields = list(struct.unpack_from(fmt, encoded))
  fields[6] += 1  # one more coarse patch than the image has
  body = struct.pack(fmt, *fields) + encoded[struct.calcsize(fmt):-4]
  with pytest.raises(BitstreamError, match="do not add up"):
    codec.decompress(cmodel, _with_crc(body))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_only_bitstream_errors(cmodel, encoded, data):
  d = bytearray(encoded)
  op = data.draw(st.sampled_from(["flip", "truncate", "insert", "payload_fixed_crc"]))
  if op == "flip":
    i = data.draw(st.integers(0, len(d) - 1))
    d[i] ^= 1 << data.draw(st.integers(0, 7))
  elif op == "truncate":
    d = d[:data.draw(st.integers(0, len(d) - 1))]
  elif op == "insert":
    i = data.draw(st.integers(0, len(d)))
    d[i:i] = data.draw(st.binary(min_size=1, max_size=8))
  else:  # corrupt the payload but keep the checksum valid: the range decoder must cope
    body = bytearray(encoded[:-4])
    i = data.draw(st.integers(bitstream.CONTAINER_BYTES - 4, len(body) - 1))
    body[i] = data.draw(st.integers(0, 255))
    d = bytearray(_with_crc(bytes(body)))
  try:
    out = codec.decompress(cmodel, bytes(d))
  except BitstreamError:
    return
  # whatever decodes is the image that was encoded: a changed payload that still decodes
  # must be caught by the symbol digest, never become another image
  np.testing.assert_array_equal(out, codec.decompress(cmodel, encoded))


def test_bad_images_rejected(cmodel):
  with pytest.raises(images.ImageError, match="shape"):
    codec.compress(cmodel, np.zeros((8, 8, 7), np.uint8))
  big = np.zeros((1, cmodel.codec["max_pixels"] + 1), np.uint8)
  with pytest.raises(images.ImageError, match="over the limit"):
    codec.compress(cmodel, big)
  with pytest.raises(ValueError, match="ratios"):
    codec.compress(cmodel, np.zeros((16, 16, 3), np.uint8), ratios=(0.5, 0.6, 0.1))


def test_cli_round_trip_and_errors(ckpt_dir, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray(images.bundled_photo("chelsea")[:48, :40]).save(src / "a.png")
  Image.fromarray(images.bundled_photo("coffee")[:33, :50]).convert("L").save(src / "b.jpg")
  run = lambda *a: subprocess.run([sys.executable, "-m", "hvq_jax.cli", *a], capture_output=True, text=True)
  r = run("compress", str(src), "-o", str(tmp_path / "enc"), "--checkpoint", ckpt_dir, "--no-progress")
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(tmp_path / "enc")) == ["a.hvq", "b.hvq"]
  r = run("decompress", str(tmp_path / "enc"), "-o", str(tmp_path / "dec"), "--checkpoint", ckpt_dir)
  assert r.returncode == 0, r.stderr
  assert np.asarray(Image.open(tmp_path / "dec" / "b.png")).shape == (33, 50, 3)
  bad = tmp_path / "bad.hvq"
  bad.write_bytes((tmp_path / "enc" / "a.hvq").read_bytes()[:-20])
  r = run("decompress", str(bad), "-o", str(tmp_path / "bad.png"), "--checkpoint", ckpt_dir)
  assert r.returncode == 1 and "truncated" in r.stderr
  assert not (tmp_path / "bad.png").exists()
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".hvq-")]
  r = run("decompress", str(bad), "-o", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / "nope"))
  assert r.returncode != 0 and "no such checkpoint" in r.stderr


# ---- portability: every frequency from integers, desyncs caught -------------------------------
def test_old_format_version_is_refused_by_name(cmodel, encoded):
  v1 = encoded[:4] + bytes([1]) + encoded[5:]
  with pytest.raises(BitstreamError, match="format version 1"):
    codec.decompress(cmodel, v1)


def test_altered_payload_with_valid_crc_is_an_error_never_an_image(cmodel, encoded):
  """Every single-byte payload change (CRC recomputed) raises; the symbol digest catches
  those the range decoder cannot see."""
  body = encoded[:-4]
  start = bitstream.CONTAINER_BYTES - 4
  caught_by_digest = 0
  for i in range(start, len(body), max(1, (len(body) - start) // 24)):
    changed = body[:i] + bytes([body[i] ^ 0x5A]) + body[i + 1:]
    with pytest.raises(BitstreamError) as e:
      codec.decompress(cmodel, _with_crc(changed))
    caught_by_digest += "symbol digest" in str(e.value)
  assert caught_by_digest > 0


def _float_grid(cmodel, dtype):
  """What the float entropy path (format 1) built its PMFs from: the float hyper-
  synthesis' mu and log sigma, rounded to a 2^-12 / 2^-8 grid, for the fine branch."""
  from hvq_jax.nn import model as model_lib
  cfg = cmodel.cfg.copy_and_resolve_references()
  cfg.dtype = dtype
  mdl = model_lib.build(cfg)
  z = np.random.default_rng(0).integers(-3, 4, (1, 4, 5, cfg.hyperprior.latent_channels))
  grid = (4 * 2 ** cfg.hyperprior.num_down, 5 * 2 ** cfg.hyperprior.num_down)
  mu, sigma = jax.device_get(mdl.apply({"params": cmodel.params}, "fine",
                                       jnp.asarray(z, jnp.float32), grid,
                                       method=model_lib.HVQ.prior))
  return np.round(mu / 2.0 ** -12), np.round(np.log(sigma) / 2.0 ** -8)


def test_decoding_ignores_float_numerics(ckpt_dir, cmodel, encoded):
  """Decode with the model's float networks in bfloat16 (a different 'device'): the
  symbols are identical, because no frequency depends on a float network. The float
  entropy path of format 1 would have built other PMFs from the same z: show it."""
  mu32, ls32 = _float_grid(cmodel, "float32")
  mu16, ls16 = _float_grid(cmodel, "bfloat16")
  assert (mu32 != mu16).mean() > 0.5 or (ls32 != ls16).mean() > 0.5   # old path: desync
  from hvq_jax.codec.model import CodecModel
  cfg = cmodel.config.copy_and_resolve_references()
  cfg.model.dtype = "bfloat16"
  other = CodecModel(cfg, cmodel.params)
  assert other.fingerprint == cmodel.fingerprint
  _, idx16, gmap16 = codec.decode_indices(other, encoded)
  _, idx32, gmap32 = codec.decode_indices(cmodel, encoded)
  np.testing.assert_array_equal(gmap16, gmap32)
  for k in idx32:
    np.testing.assert_array_equal(idx16[k], idx32[k])


def test_index_weights_on_device_equal_numpy(cmodel, photo):
  """The codec builds index weights with jitted int32 JAX; the PyTorch decoder with numpy."""
  from hvq_jax.entropy import integer
  rng = np.random.default_rng(1)
  t = cmodel.tables["fine"]
  mu = rng.integers(-(1 << 14), (1 << 14) + 1, (3000, cmodel.cfg.embed_dim))
  ls = rng.integers(t.ls_lo, t.ls_hi + 1, (3000, cmodel.cfg.embed_dim))
  np.testing.assert_array_equal(cmodel.index_weights("fine", mu, ls),
                                integer.branch_index_weights(t, mu, ls).astype(np.float32))


def test_words_appended_to_the_payload_are_refused(cmodel, encoded):
  """A payload with extra words (n_words and CRC fixed up) decodes the same symbols; the
  decoder must still refuse it (found by benchmarks/fuzz_codec.py)."""
  fmt = "<4sB8sIIf3I8sI"
  fields = list(struct.unpack_from(fmt, encoded))
  fields[-1] += 2
  body = struct.pack(fmt, *fields) + encoded[struct.calcsize(fmt):-4] + bytes(8)
  with pytest.raises(BitstreamError, match="after its last symbol"):
    codec.decompress(cmodel, _with_crc(body))
