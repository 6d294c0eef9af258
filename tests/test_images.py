"""Image input rules (hvq_jax/images.py) and the size limit (codec/memory.py memory_estimate).

16-bit files are written here by an independent PNG encoder (zlib + the five PNG filters +
Adam7), by tifffile and by hand (PPM), and every expected pixel is computed from the
16-bit samples in float64: round(x / 257), alpha composited on white.
"""
import functools
import struct
import types
import zlib

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from PIL import Image

from hvq_jax import images, layout
from hvq_jax.codec import coder, memory
from hvq_jax.codec.model import CheckpointError, CodecModel
from hvq_jax.configs import default, tiny_cpu
from hvq_jax.entropy.bitstream import BitstreamError
from hvq_jax.nn import model as model_lib
from tests.conftest import micro_config


# ---- an independent 16-bit PNG writer --------------------------------------------------------
def _filter_rows(raw: np.ndarray, bpp: int, filters) -> bytes:
  """Filter each row of raw bytes [h, n] (PNG spec 9.2) with filters[i % len(filters)]."""
  out = []
  prev = np.zeros(raw.shape[1], np.int32)
  for i, row in enumerate(raw.astype(np.int32)):
    f = filters[i % len(filters)]
    left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
    if f == 0:
      pred = 0
    elif f == 1:
      pred = left
    elif f == 2:
      pred = prev
    elif f == 3:
      pred = (left + prev) // 2
    else:
      p = left + prev - upleft
      pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
      pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
    out.append(bytes([f]) + ((row - pred) % 256).astype(np.uint8).tobytes())
    prev = row
  return b"".join(out)


def write_png16(path, a: np.ndarray, filters=(0, 1, 2, 3, 4), interlace=False, trns=None):
  """uint16 [H, W, C] (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) -> a 16-bit PNG file."""
  h, w, c = a.shape
  bpp = 2 * c
  if interlace:
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
              (0, 1, 2, 2), (1, 0, 2, 1)]   # (y0, x0, dy, dx)
    data = b""
    for y0, x0, dy, dx in passes:
      sub = a[y0::dy, x0::dx]
      if sub.size:
        raw = np.frombuffer(sub.astype(">u2").tobytes(), np.uint8).reshape(sub.shape[0], -1)
        data += _filter_rows(raw, bpp, filters)
  else:
    raw = np.frombuffer(a.astype(">u2").tobytes(), np.uint8).reshape(h, -1)
    data = _filter_rows(raw, bpp, filters)
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, int(interlace))
  body = chunk(b"IHDR", ihdr)
  if trns is not None:
    body += chunk(b"tRNS", struct.pack(">" + "H" * len(trns), *trns))
  body += chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + body)


def expected_from_16(a: np.ndarray) -> np.ndarray:
  """float64 reference: samples / 65535, alpha composited on white, round(x * 255)."""
  f = a.astype(np.float64) / 65535
  if f.shape[-1] in (2, 4):
    f = f[..., :-1] * f[..., -1:] + (1 - f[..., -1:])
  if f.shape[-1] == 1:
    f = np.repeat(f, 3, -1)
  return np.round(f * 255).astype(np.uint8)


def _samples(shape, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 65536, shape).astype(np.uint16)
  a.reshape(-1)[:4] = [0x12FF, 0x0180, 0xFFFF, 0x807F]   # high byte alone rounds wrong
  return a


# ---- 16-bit files -----------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("interlace", [False, True])
def test_16_bit_png_keeps_its_low_byte(tmp_path, channels, interlace):
  a = _samples((19, 23, channels))
  p = str(tmp_path / "x.png")
  write_png16(p, a, interlace=interlace)
  got = images.read_image(p)
  want = expected_from_16(a)
  np.testing.assert_array_equal(got, want)
  if channels == 3:   # what Pillow alone gives, the high bytes, is wrong in many pixels
    with Image.open(p) as im:
      assert (np.asarray(im) != want).mean() > 0.2


def test_16_bit_png_transparency_colour(tmp_path):
  a = _samples((6, 7, 3), seed=1)
  a[2, 3] = (1000, 2000, 3000)
  p = str(tmp_path / "t.png")
  write_png16(p, a, trns=(1000, 2000, 3000))
  want = expected_from_16(a)
  want[2, 3] = 255   # the transparent colour composites to white
  np.testing.assert_array_equal(images.read_image(p), want)


def test_8_bit_png_transparency_colour(tmp_path):
  a = np.full((4, 5, 3), 40, np.uint8)
  a[1, 1] = (10, 20, 30)
  p = str(tmp_path / "t8.png")
  Image.fromarray(a).save(p, transparency=(10, 20, 30))
  want = a.copy()
  want[1, 1] = 255
  np.testing.assert_array_equal(images.read_image(p), want)


@pytest.mark.parametrize("kw", [dict(byteorder="<"), dict(byteorder=">"),
                                dict(compression="zlib")])
def test_16_bit_tiff_keeps_its_low_byte(tmp_path, kw):
  tifffile = pytest.importorskip("tifffile")
  a = _samples((9, 11, 3), seed=2)
  p = str(tmp_path / "x.tif")
  tifffile.imwrite(p, a, photometric="rgb", **kw)
  np.testing.assert_array_equal(images.read_image(p), expected_from_16(a))


def test_16_bit_gray_png_and_pgm(tmp_path):
  a = _samples((5, 6, 1), seed=3)
  p = tmp_path / "g.png"
  Image.fromarray(a[..., 0]).save(p)        # Pillow writes 16-bit gray PNG itself
  np.testing.assert_array_equal(images.read_image(str(p)), expected_from_16(a))
  q = tmp_path / "g.pgm"
  q.write_bytes(b"P5\n6 5\n65535\n" + a[..., 0].astype(">u2").tobytes())
  np.testing.assert_array_equal(images.read_image(str(q)), expected_from_16(a))


def test_16_bit_ppm(tmp_path):
  a = _samples((4, 3, 3), seed=4)
  q = tmp_path / "c.ppm"
  q.write_bytes(b"P6\n3 4\n65535\n" + a.astype(">u2").tobytes())
  np.testing.assert_array_equal(images.read_image(str(q)), expected_from_16(a))


# ---- integer (mode "I") and float images ----------------------------------------------------
def test_mode_i_in_the_8_bit_range_is_8_bit(tmp_path):
  a = np.arange(30, dtype=np.int32).reshape(5, 6) * 8   # 0..232
  p = tmp_path / "i.tif"
  Image.fromarray(a).save(p)
  with Image.open(p) as im:
    assert im.mode == "I"
  np.testing.assert_array_equal(images.read_image(str(p)), np.repeat(a[..., None], 3, -1))


def test_mode_i_beyond_8_bits_without_a_declared_depth_is_refused(tmp_path):
  a = np.arange(30, dtype=np.int32).reshape(5, 6) * 100   # 0..2900
  p = tmp_path / "wide.tif"
  Image.fromarray(a).save(p)
  with pytest.raises(images.ImageError, match=r"wide.tif.*values in \[0, 2900\].*0..255"):
    images.read_image(str(p))


def test_integer_arrays():
  a = np.array([[0, 7, 255]], np.int64)   # e.g. np.array of a Python list
  np.testing.assert_array_equal(images.to_rgb_uint8(a)[..., 0], [[0, 7, 255]])
  with pytest.raises(images.ImageError, match=r"int32 image with values in \[-1, 3\]"):
    images.to_rgb_uint8(np.array([[-1, 3]], np.int32))
  with pytest.raises(images.ImageError, match="uint16 for 16-bit"):
    images.to_rgb_uint8(np.array([[300]], np.int32))


def test_float_images_must_lie_in_unit_range():
  f = np.array([[0.0, 0.25, 1.0], [0.5, 0.999, 1.0 + 0.4 / 255]])
  np.testing.assert_array_equal(images.to_rgb_uint8(f)[..., 0],
                                [[0, 64, 255], [128, 255, 255]])
  photo = images.bundled_photo("coffee").astype(np.float32)   # 0-255 floats
  with pytest.raises(images.ImageError, match=r"float image with values in \[0, 255\].*"
                                              r"divide by 255"):
    images.to_rgb_uint8(photo)
  np.testing.assert_array_equal(images.to_rgb_uint8(photo / 255), photo.astype(np.uint8))
  with pytest.raises(images.ImageError, match=r"\[-0.5, "):
    images.to_rgb_uint8(np.array([[-0.5, 0.5]]))
  with pytest.raises(images.ImageError, match="non-finite"):
    images.to_rgb_uint8(np.array([[np.nan, 0.5]]))


def test_float_rgba_composites_at_full_precision():
  rgba = np.array([[[1.0, 0.0, 0.5, 0.5]]])
  np.testing.assert_array_equal(images.to_rgb_uint8(rgba), [[[255, 128, 191]]])


def test_float_tiff(tmp_path):
  p = tmp_path / "f.tif"
  Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.2]], np.float32)).save(p)
  np.testing.assert_array_equal(images.read_image(str(p))[..., 0], [[0, 128], [255, 51]])
  Image.fromarray(np.array([[0.0, 200.0]], np.float32)).save(p)
  with pytest.raises(images.ImageError, match=r"f.tif: float image with values in \[0, 200\]"):
    images.read_image(str(p))


def test_compress_refuses_bad_arrays_by_name(micro_codec):
  with pytest.raises(images.ImageError, match="float image with values in"):
    coder.compress(micro_codec, np.full((16, 16, 3), 200.0, np.float32))


# ---- how large an image fits -------------------------------------------------------------------
def _stand_in(cfg, **codec):
  """What the size limit reads from a CodecModel: the model config and codec settings."""
  return types.SimpleNamespace(cfg=cfg.model, codec=dict(cfg.codec, **codec))


def test_default_model_refuses_what_does_not_fit_by_name():
  m = _stand_in(default.get_config(), memory_budget_gb=20.0)
  # attention holds [chunk, T] score blocks: at 4096^2 the decoder's stride-16 attention
  # (65,536 tokens) takes 2 * 4 * 1024 * 65,536 bytes, not the 34 GB of [T, T] matrices
  est = memory.memory_estimate(m.cfg, 4096, 4096)
  assert est["attention"][1:] == (8, 262144, 2 * 4 * 1024 * 262144)   # the encoder's heads
  with pytest.raises(images.ImageError) as e:
    coder.prepare_image(m, np.zeros((4096, 4096, 3), np.uint8))
  msg = str(e.value)
  # what decides: the decoder's full-resolution maps (4 of the upsampled 256 channels)
  assert "the largest part is its decoder's feature maps at stride 1 (256 channels)" in msg
  part = float(msg.split("(256 channels), ")[1].split(" GB")[0])
  assert 4 * 256 * 4096 ** 2 * 4 / 1e9 <= part <= est["decode"] / 1e9
  assert "budget is 20 GB" in msg and "memory_budget_gb" in msg
  h, w = map(int, msg.split("can code here is about ")[1].split(" ")[0].split("x"))
  assert h == w and 256 <= h < 4096
  memory.check_size(m, h, w)          # the size it names fits ...
  with pytest.raises(images.ImageError):
    memory.check_size(m, h + 16, w + 16)   # ... and one more coarse patch does not


def test_memory_grows_linearly_with_pixels():
  """Twice the budget codes twice the pixels: no term of the estimate is quadratic."""
  for cfg in (tiny_cpu.get_config(), default.get_config()):
    per_mp = [max(memory.memory_estimate(cfg.model, h, w)[k] for k in ("encode", "decode"))
              / (h * w) for h, w in ((512, 512), (3024, 4032), (4000, 6000), (8192, 8192))]
    assert max(per_mp) < 1.1 * min(per_mp), per_mp


def test_largest_size_follows_aspect_and_budget():
  m = _stand_in(tiny_cpu.get_config(), memory_budget_gb=4.0)
  h, w = memory.largest_size(m, aspect=2.0)
  assert 1.9 < h / w < 2.1
  h2, _ = memory.largest_size(_stand_in(tiny_cpu.get_config(), memory_budget_gb=8.0), 2.0)
  assert 1.38 < h2 / h < 1.45   # twice the memory, twice the pixels (sqrt(2) the side)


def test_default_budget_is_three_quarters_of_the_device():
  m = _stand_in(micro_config())
  budget, source = memory.memory_budget(m)
  import os
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert budget == pytest.approx(0.75 * ram) and "75%" in source


@functools.lru_cache(maxsize=None)
def _compiled_bytes(which: str, h: int, w: int):
  """XLA's own figure for the temporary memory of the encoder and decoder programs."""
  cfg = {"micro": micro_config, "tiny": tiny_cpu.get_config,
         "default": default.get_config}[which]()
  m = model_lib.build(cfg.model)
  params = jax.eval_shape(functools.partial(model_lib.init_params, m, image_size=32),
                          jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  enc = jax.jit(lambda p, x: m.apply({"params": p}, x, jnp.ones((1,)), jnp.asarray(
      [0.1, 0.4, 0.5]), method=model_lib.HVQ.encode_latents))
  grids = layout.grids(h, w, tuple(cfg.model.strides))
  idx = {k: jax.ShapeDtypeStruct((1,) + grids[g], jnp.int32)
         for k, g, _ in layout.branches(cfg.model)}
  gmap = jax.ShapeDtypeStruct((1, h // 16, w // 16), jnp.int32)
  dec = jax.jit(lambda p, i, g: m.apply({"params": p}, i, g, (h, w),
                                        method=model_lib.HVQ.decode_latents))
  e = enc.lower(params, x).compile().memory_analysis().temp_size_in_bytes
  d = dec.lower(params, idx, gmap).compile().memory_analysis().temp_size_in_bytes
  return cfg, e, d


@pytest.mark.parametrize("which,h,w", [
    ("micro", 256, 384), ("tiny", 512, 512),
    pytest.param("tiny", 2048, 3072, marks=pytest.mark.slow),     # 6.3 MP: linear
    pytest.param("default", 512, 512, marks=pytest.mark.slow)])
def test_estimate_bounds_xla_memory_analysis(which, h, w):
  cfg, enc, dec = _compiled_bytes(which, h, w)
  est = memory.memory_estimate(cfg.model, h, w)
  assert dec <= est["decode"] <= 2 * dec, (dec, est)
  assert enc <= est["encode"] <= 3 * enc, (enc, est)


def test_codec_refuses_over_budget_on_both_sides(micro, micro_codec):
  cfg, _, params = micro
  photo = images.bundled_photo("coffee")[:64, :96]
  data = coder.compress(micro_codec, photo)
  small = cfg.copy_and_resolve_references()
  small.codec.memory_budget_gb = 0.0005
  m = CodecModel(small, micro_codec.params)
  assert m.fingerprint == micro_codec.fingerprint   # a budget never changes the symbols
  with pytest.raises(images.ImageError, match=r"coding a 64x96 image needs about .* the "
                                              r"budget is 0.0005 GB"):
    coder.compress(m, photo)
  with pytest.raises(BitstreamError, match="decoding a 64x96 image needs about"):
    coder.decompress(m, data)


# ---- checkpoints with non-finite params -------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_params_are_refused_by_name(micro, bad):
  cfg, _, params = micro
  leaves, tree = jax.tree.flatten(params)
  i = max(range(len(leaves)), key=lambda j: leaves[j].size)
  broken = np.array(leaves[i])
  broken.reshape(-1)[7] = bad
  leaves = list(leaves)
  leaves[i] = jnp.asarray(broken)
  with pytest.raises(CheckpointError, match="NaN or Inf"):
    CodecModel(cfg, jax.tree.unflatten(tree, leaves))


def test_hvq_compress_names_a_non_finite_checkpoint(micro, tmp_path):
  """End to end: a checkpoint (as Orbax stores it) whose params hold a NaN; `hvq compress`
  says so, exits non-zero and writes nothing."""
  import subprocess
  import sys
  from hvq_jax import checkpoint as ckpt_lib
  cfg, _, params = micro
  leaves, tree = jax.tree.flatten(params)
  leaves = [np.array(a) for a in leaves]
  leaves[0].reshape(-1)[0] = np.nan
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ck.save(0, {"params": jax.tree.unflatten(tree, leaves)}, config=cfg)
  ck.close()
  src = tmp_path / "a.png"
  Image.fromarray(images.bundled_photo("coffee")[:32, :32]).save(src)
  r = subprocess.run([sys.executable, "-m", "hvq_jax.cli", "compress", str(src), "-o",
                      str(tmp_path / "a.hvq"), "--checkpoint", str(tmp_path / "ckpt")],
                     capture_output=True, text=True)
  assert r.returncode != 0 and "NaN or Inf" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "a.hvq").exists()
