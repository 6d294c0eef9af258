"""The file's colour transform (hvq_jax/colour.py, format 4), against numpy references."""
import dataclasses
import zlib

import numpy as np
import pytest

from hvq_jax import codec
from hvq_jax import colour
from hvq_jax import images
from hvq_jax.entropy import bitstream
from hvq_jax.entropy.bitstream import BitstreamError


@pytest.fixture(scope="module")
def cmodel(micro_codec):
  return micro_codec


@pytest.fixture(scope="module")
def photo():
  return images.bundled_photo("chelsea")[40:136, 100:228]    # 96x128


def _reference_fit(decoded, original):
  """Ordinary least squares of original on [decoded, 1] (float64 lstsq, no ridge)."""
  x = np.concatenate([decoded.reshape(-1, 3).astype(np.float64),
                      np.ones((decoded.size // 3, 1))], 1)
  w, *_ = np.linalg.lstsq(x, original.reshape(-1, 3).astype(np.float64), rcond=None)
  return w


def test_fit_is_least_squares_up_to_quantisation_and_ridge():
  rng = np.random.default_rng(0)
  orig = rng.integers(0, 256, (64, 80, 3)).astype(np.uint8)
  mix = np.array([[0.6, 0.1, 0.0], [0.1, 0.7, 0.1], [0.0, 0.05, 0.5]])
  dec = np.clip(orig @ mix + 40 + rng.normal(0, 4, orig.shape), 0, 255).astype(np.uint8)
  w = _reference_fit(dec, orig)
  words = colour.fit(dec, orig)
  g = np.asarray(words[:9]).reshape(3, 3) / colour.GAIN_SCALE
  o = np.asarray(words[9:]) / colour.OFFSET_SCALE
  np.testing.assert_allclose(g, w[:3], atol=0.01)      # 1e-4 ridge: gains within 1%
  np.testing.assert_allclose(o, w[3], atol=1.5)
  # applied: within a level of the reference's float map, and far closer to the original
  ref = np.clip(np.floor(dec.reshape(-1, 3) @ w[:3] + w[3] + 0.5), 0, 255).reshape(orig.shape)
  out = colour.apply(dec, words)
  assert np.abs(out.astype(int) - ref).mean() < 0.6
  err = lambda a: np.mean((a.astype(float) - orig) ** 2)
  assert err(out) < 0.2 * err(dec)


def test_apply_is_the_integer_formula():
  rng = np.random.default_rng(1)
  dec = rng.integers(0, 256, (33, 17, 3)).astype(np.uint8)
  words = tuple(rng.integers(-9000, 9000, 12))
  num = dec.reshape(-1, 3).astype(np.int64) @ np.asarray(words[:9]).reshape(3, 3) \
      + np.asarray(words[9:]) * (colour.GAIN_SCALE // colour.OFFSET_SCALE)
  # num / 4096 is exact in float64, so floor(x + 1/2) is the same rounding computed apart
  want = np.clip(np.floor(num / 4096.0 + 0.5), 0, 255).astype(np.uint8).reshape(dec.shape)
  np.testing.assert_array_equal(colour.apply(dec, words), want)
  np.testing.assert_array_equal(colour.apply(dec, colour.IDENTITY), dec)


def test_flat_image_keeps_unit_gains():
  """Singular least squares (one colour): the ridge keeps G at 1, the offset moves the mean."""
  dec = np.full((20, 30, 3), (100, 120, 90), np.uint8)
  orig = np.full((20, 30, 3), (104, 117, 90), np.uint8)
  words = colour.fit(dec, orig)
  np.testing.assert_array_equal(colour.apply(dec, words), orig)
  g = np.asarray(words[:9]).reshape(3, 3) / colour.GAIN_SCALE
  assert np.abs(g - np.eye(3)).max() < 0.05


def test_file_carries_the_fit_of_its_own_decoded_image(cmodel, photo):
  data = codec.compress(cmodel, photo)
  plain = codec.compress(cmodel, photo, colour=False)
  header = bitstream.unpack(data)[0]
  assert header.version == 4 and len(data) == len(plain)       # 24 bytes in both
  net = codec.decompress(cmodel, plain)                         # the networks' pixels alone
  assert header.colour == colour.fit(net, photo)
  out = codec.decompress(cmodel, data)
  np.testing.assert_array_equal(out, colour.apply(net, header.colour))
  err = lambda a: np.mean((a.astype(float) - photo) ** 2)
  assert err(out) < err(net)
  shift = lambda a: np.abs(a.reshape(-1, 3).mean(0) - photo.reshape(-1, 3).mean(0)).max()
  assert shift(out) < 1.0 <= shift(net)


def _repack(data, **change):
  header, payload = bitstream.unpack(data)
  return bitstream.pack(dataclasses.replace(header, **change), payload)


def test_changed_colour_words_are_an_error_never_an_image(cmodel, photo):
  data = codec.compress(cmodel, photo)
  words = list(bitstream.unpack(data)[0].colour)
  words[4] += 1
  with pytest.raises(BitstreamError, match="symbol digest"):
    codec.decompress(cmodel, _repack(data, colour=tuple(words)))
  # a byte of the block changed and the CRC fixed: the same
  body = bytearray(data[:-4])
  body[bitstream.container_bytes(4) - 4 - 24 + 3] ^= 0x10
  body = bytes(body)
  with pytest.raises(BitstreamError, match="symbol digest"):
    codec.decompress(cmodel, body + zlib.crc32(body).to_bytes(4, "little"))


def test_format_2_file_decodes_without_a_transform(cmodel, photo):
  """A file written before format 4 (the payload alone, the digest of its symbols alone)
  decodes to the networks' pixels."""
  from hvq_jax import layout
  from hvq_jax.codec import coder
  plain = codec.compress(cmodel, photo, colour=False)
  _, rec = coder.code_image(cmodel, photo, *coder.settings(cmodel, None, None), colour=False)
  v = layout.payload_version(cmodel.cfg)
  old = _repack(plain, version=v, colour=None, symbols=rec.digest())
  assert old[4] == v and len(old) == len(plain) - 24
  np.testing.assert_array_equal(codec.decompress(cmodel, old), codec.decompress(cmodel, plain))
  with pytest.raises(BitstreamError, match="format version"):
    codec.decompress(cmodel, _repack(plain, version=5 - v, colour=None, symbols=rec.digest()))


def test_fit_never_sends_a_worse_image():
  """A decoded image of little variance against a full-range original: the gains clip at
  int16; the offsets are refitted to them, and the words sent never raise the error."""
  rng = np.random.default_rng(2)
  orig = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
  err = lambda a: np.mean((a.astype(float) - orig) ** 2)
  for dec in (128 + (orig.astype(int) - 128) // 40, 200 + (orig.astype(int) - 128) // 60,
              np.full(orig.shape, 255)):
    dec = dec.astype(np.uint8)
    assert err(colour.apply(dec, colour.fit(dec, orig))) <= err(dec)


def test_bound_is_the_largest_gain_column_sum():
  rng = np.random.default_rng(3)
  words = tuple(int(v) for v in rng.integers(-9000, 9000, 12))
  a = rng.integers(1, 255, (30, 40, 3)).astype(np.uint8)
  b = (a.astype(int) + rng.integers(-1, 2, a.shape)).clip(0, 255).astype(np.uint8)
  diff = np.abs(colour.apply(a, words).astype(int) - colour.apply(b, words).astype(int)).max()
  g = np.abs(np.asarray(words[:9]).reshape(3, 3)).sum(0).max() / colour.GAIN_SCALE
  assert colour.bound(words) == int(np.ceil(g)) and diff <= colour.bound(words)
  assert colour.bound(colour.IDENTITY) == colour.bound(None) == 1
