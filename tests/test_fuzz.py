"""The decoder under fuzzing (benchmarks/fuzz_codec.py): every mutated .hvq file is a
BitstreamError or decodes to the original image; the symbol digest covers every stream.

The default suite runs N_MUTATIONS mutations on files of two sizes made by three untrained
micro models (hyperprior on, off, residual VQ); `benchmarks/fuzz_codec.py --n 100000`
runs the large version in worker processes that also catch crashes and hangs.
"""
import struct
import time
import zlib

import numpy as np
import pytest

from benchmarks import fuzz_codec
from hvq_jax import codec, images
from hvq_jax.codec import profile
from hvq_jax.entropy import streams
from hvq_jax.entropy.bitstream import BitstreamError

# Measured on a 2-core CPU shared with other jobs (load 4-5): setup (3 models, 2 sizes: 6
# encoder programs to compile) 33 s with a cold compilation cache, 15 s warm, then about
# 500 mutations/s; with 4,000 the whole file takes 50 s cold, 30 s warm.
N_MUTATIONS = 1500
SIZES = ((16, 16), (29, 45))


@pytest.fixture(scope="module")
def result():
  t = time.perf_counter()
  r = fuzz_codec.run(N_MUTATIONS, seed=0, kinds=fuzz_codec.KINDS, sizes=SIZES, workers=0,
                     pixels=False)
  r["wall_s"] = time.perf_counter() - t
  return r


def test_every_mutation_is_an_error_or_the_original(result):
  assert result["outcomes"]["bitstream_error"] + result["outcomes"]["identical"] == N_MUTATIONS
  assert result["failures_total"] == 0, result["failures"][:3]


def test_the_fuzzer_reaches_every_check(result):
  """Not only the CRC: every mutation kind and model kind ran, a good share got past the
  container into the range decoder, and the symbol digest is what caught most of those."""
  assert set(result["per_mutation"]) == set(fuzz_codec.MUTATIONS)
  assert set(result["per_model"]) == set(fuzz_codec.KINDS)
  r = result["reasons"]
  for check in ("crc", "length", "magic", "version", "fingerprint", "size", "counts",
                "lambda", "map_vs_counts", "symbol_digest"):
    assert r.get(check, 0) > 0, (check, r)
  deep = r["symbol_digest"] + r["map_vs_counts"] + r.get("range_decoder", 0)
  assert deep > 0.3 * N_MUTATIONS, r
  # the decoder never reads lambda: a valid new lambda decodes to the same image
  assert result["per_variant"]["header_field/lmbda_valid"] == {
      "identical": result["per_variant"]["header_field/lmbda_valid"]["identical"]}


def _crc_ok(data: bytes) -> bool:
  return len(data) >= 4 and zlib.crc32(data[:-4]) == struct.unpack("<I", data[-4:])[0]


def test_mutations_keep_the_crc_where_they_should(result):
  """Header and payload mutations rewrite the CRC (they test what lies behind it), and
  every mutation changes the file."""
  rng = np.random.default_rng(5)
  d = codec.compress(_models()["hyperprior"], images.bundled_photo("coffee")[:29, :45])
  other = codec.compress(_models()["hyperprior"], images.bundled_photo("chelsea")[:29, :45])
  seen = set()
  for _ in range(600):
    kind, variant, out = fuzz_codec.mutate(rng, d, other)
    seen.add(kind)
    assert out != d
    if kind in ("header_field", "payload_crc", "splice") or variant.startswith(
        ("magic_version", "valid_header")):
      assert _crc_ok(out), (kind, variant)
  assert seen == set(fuzz_codec.MUTATIONS)


_MODELS = {}


def _models():
  if not _MODELS:   # the same models as the fuzz run's (seed 0): compiled programs are shared
    _MODELS.update(fuzz_codec.build_models(fuzz_codec.KINDS, None, 0))
  return _MODELS


class _Altering(streams.Recorder):
  """An encoder that range-codes call `target` (a stream, or one pass of an index stream) with
  one symbol changed (the map: two classes swapped, so the counts still hold); what follows
  is coded consistently with it. `sizes` collects every call's symbol count."""
  target = -1
  sizes = []

  def code(self, stream, weights, where=None):
    i = len(self.streams)
    sym = super().code(stream, weights, where).copy()
    _Altering.sizes.append(len(sym))
    if i == self.target:
      if stream.kind == "map":
        j = np.flatnonzero(sym != sym[0])[0]
        sym[0], sym[j] = sym[j], sym[0]
      else:
        sym[len(sym) // 2] = (sym[len(sym) // 2] + 1) % weights.shape[1]
      self.streams[i] = (sym, weights)
    return sym


@pytest.mark.parametrize("kind", ["hyperprior", "residual_vq"])
def test_the_digest_covers_every_stream(result, monkeypatch, kind):
  """A valid range coding of other symbols, in any one stream (the map, each branch's z,
  each branch's indices), under the original file's header and digest, is refused."""
  m = _models()[kind]
  img = images.bundled_photo("coffee")[:29, :45]
  settings = dict(lmbda=0.2, ratios=(0.3, 0.3, 0.4))
  plain, stats = profile.compress(m, img, **settings)
  n_streams = 1 + len(stats["branch_bits"]) * (2 if m.hyper_on else 1)
  assert n_streams == (7 if kind == "hyperprior" else 13)
  off, size = fuzz_codec.FIELDS["digest"]
  monkeypatch.setattr(streams, "Recorder", _Altering)
  monkeypatch.setattr(_Altering, "sizes", [])
  codec.compress(m, img, **settings)            # target -1: counts the calls
  calls = [i for i, n in enumerate(_Altering.sizes) if n]
  assert len(calls) >= n_streams
  for target in calls:
    monkeypatch.setattr(_Altering, "target", target)
    other = codec.compress(m, img, **settings)
    assert other[fuzz_codec.HEAD:-4] != plain[fuzz_codec.HEAD:-4]
    forged = fuzz_codec.with_crc(other[:off] + plain[off:off + size] + other[off + size:-4])
    with pytest.raises(BitstreamError, match="symbol digest"):
      codec.decompress(m, forged)


# ---- crash and hang handling of the worker pool -------------------------------------------------
def _fake_worker(conn, *args):
  """Decodes nothing: crashes on b"crash", hangs on b"hang", else a BitstreamError."""
  import os
  conn.send(("ready", dict(setup_s=0.0, originals=[dict(model="m", size="1x1", lmbda=None,
                                                         ratios=None, data=b"x")],
                           fingerprints={"m": "00"})))
  while True:
    msg = conn.recv()
    if msg is None:
      return
    for i, _, data in msg:
      if data == b"crash":
        os._exit(3)
      if data == b"hang":
        time.sleep(60)
      conn.send((i, "bitstream_error", "magic", 0.0))


def test_pool_counts_crashes_and_hangs_and_goes_on():
  pool = fuzz_codec._Pool(1, (), (), None, 0, "cpu", hang_s=2.0, target=_fake_worker)
  try:
    out = pool.run(0, [(0, 0, b"a"), (1, 0, b"crash"), (2, 0, b"b"), (3, 0, b"hang"),
                       (4, 0, b"c")])
  finally:
    pool.close()
  assert [(i, o) for i, o, _, _ in out] == [(0, "bitstream_error"), (1, "crash"),
                                             (2, "bitstream_error"), (3, "hang"),
                                             (4, "bitstream_error")]
  assert "exit code 3" in out[1][2]
