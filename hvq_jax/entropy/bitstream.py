"""The .hvq file format: a versioned container around one range-coded payload.

Layout (little-endian):
  magic    4 bytes  b"HVQC"
  version  u8       FORMAT_VERSION
  model    8 bytes  fingerprint of the params and config that wrote it
  height   u32, width u32                      original image size
  lmbda    f32                                 rate setting used by the encoder
  counts   3 x u32                             coarse/medium/fine patch counts (the ratios)
  symbols  8 bytes  sha256 of the coded symbols (entropy/streams.py), checked after decoding
  length   u32                                 payload size in 32-bit words
  colour   12 x i16                            format 4: the colour transform (hvq_jax/colour.py)
  payload  length x u32                        constriction range-coder words
  crc32    u32                                 over everything above

The payload holds, in order: the granularity map (one symbol per coarse patch, class
frequencies = counts), z_hat of each branch whose granularity has sent positions
(factorized prior tables), and the VQ indices of sent positions (per-position hyperprior
PMFs), branch by branch (`layout.stream_plan`). A branch is a granularity, or with
residual VQ one stage of it (coarse, coarse_s1, ..., fine_s1: `layout.branches`); the
model fingerprint fixes which. Every frequency is an integer from the integer entropy path
(entropy/integer.py), the same on every device; the symbol digest turns any remaining
mismatch (another model or entropy path, a forged payload) into an error, never a wrong
image.

A model with a spatial context (config `hyperprior.spatial`) codes each branch's indices
in passes (`layout.pass_map`), each pass its own stream in the payload: format 3. Every
other model writes format 2, whose payload is the same as ever, so files written before
format 3 existed still decode with their models; a file whose version is not the one its
model writes is refused by version (`layout.payload_version`).

Format 4 adds the colour transform the encoder fits to its own decoded image (G 3x3 and
o 3 as int16, `hvq_jax/colour.py`), applied by the decoder to its output; its payload is
the model's (format 2's or 3's), and its words are folded into the symbol digest, so a
changed transform is an error like a changed symbol. Every model writes format 4; files of
format 2 and 3 decode as before, without a transform.

Version history: 1 (hvq_jax 0.1) built PMFs from float network outputs and carried no
symbol digest; such files do not decode exactly across devices and are refused by name.
2: integer PMFs and the symbol digest. 3: index streams in spatial passes. 4: the colour
transform.
"""
import struct
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import constriction

MAGIC = b"HVQC"
FORMAT_VERSION = 4                 # the newest this reader knows, what every model writes
KNOWN_VERSIONS = (2, 3, 4)         # 2: one index stream per branch; 3: spatial passes;
                                   # 4: either payload, and the colour transform
_HEADER = struct.Struct("<4sB8sIIf3I8sI")
_COLOUR = struct.Struct("<12h")
_CRC = struct.Struct("<I")
MAX_PIXELS = 1 << 26  # 64 Mpixel: beyond this a header is rejected before any allocation


class BitstreamError(ValueError):
  """A file that is not a valid .hvq bitstream for this model; the message says why."""


@dataclass(frozen=True)
class Header:
  fingerprint: bytes
  height: int
  width: int
  lmbda: float
  counts: Tuple[int, int, int]
  symbols: bytes = bytes(8)     # digest of the coded symbols
  version: int = FORMAT_VERSION
  colour: Optional[Tuple[int, ...]] = None   # format 4: the 12 words (hvq_jax/colour.py)


def container_bytes(version: int = FORMAT_VERSION) -> int:
  """What a file of this version holds besides the payload."""
  return _HEADER.size + (_COLOUR.size if version >= 4 else 0) + _CRC.size


CONTAINER_BYTES = container_bytes()


def colour_bytes(header: Header) -> bytes:
  """The colour words as the symbol digest takes them (nothing before format 4)."""
  return b"" if header.version < 4 else _COLOUR.pack(*header.colour)


def pack(header: Header, payload: np.ndarray) -> bytes:
  payload = np.asarray(payload, dtype="<u4")
  if header.version not in KNOWN_VERSIONS:
    raise BitstreamError(f"cannot write format version {header.version}")
  head = _HEADER.pack(MAGIC, header.version, header.fingerprint, header.height, header.width,
                      header.lmbda, *header.counts, header.symbols, payload.size)
  if header.version >= 4:
    c = header.colour
    if c is None or len(c) != _COLOUR.size // 2 or not all(-32768 <= int(v) < 32768 for v in c):
      raise BitstreamError(f"format {header.version} needs 12 colour words in int16, got {c}")
    head += _COLOUR.pack(*header.colour)
  elif header.colour is not None:
    raise BitstreamError(f"format {header.version} has no colour transform")
  body = head + payload.tobytes()
  return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes) -> Tuple[Header, np.ndarray]:
  """Parse and verify the container; raises BitstreamError naming the problem."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BitstreamError(f"expected bytes, got {type(data).__name__}")
  data = bytes(data)
  if len(data) < 4 or data[:4] != MAGIC:
    raise BitstreamError("not an .hvq bitstream (wrong magic bytes)")
  if len(data) >= 5 and data[4] == 1:
    raise BitstreamError("format version 1 (hvq_jax 0.1): its PMFs came from float networks, "
                         "so it cannot be decoded exactly on another device; this reader "
                         f"decodes version {FORMAT_VERSION}. Compress the original image again.")
  if len(data) >= 5 and data[4] not in KNOWN_VERSIONS:
    newer = "; a newer hvq_jax wrote it" if data[4] > FORMAT_VERSION else ""
    raise BitstreamError(f"unsupported format version {data[4]} (this reader knows "
                         f"versions {', '.join(map(str, KNOWN_VERSIONS))}{newer})")
  version = data[4] if len(data) >= 5 else FORMAT_VERSION
  start = container_bytes(version) - _CRC.size    # where the payload begins
  if len(data) < start + _CRC.size:
    raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than the header")
  magic, version, fp, h, w, lmbda, c0, c1, c2, digest, n_words = _HEADER.unpack_from(data)
  colour = _COLOUR.unpack_from(data, _HEADER.size) if version >= 4 else None
  expected = start + 4 * n_words + _CRC.size
  if len(data) < expected:
    raise BitstreamError(f"truncated bitstream: {len(data)} bytes, header says {expected}")
  if len(data) > expected:
    raise BitstreamError(f"trailing data: {len(data)} bytes, header says {expected}")
  (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
  if zlib.crc32(data[:expected - _CRC.size]) != crc:
    raise BitstreamError("checksum mismatch: the bitstream is corrupted")
  if not (0 < h and 0 < w and h * w <= MAX_PIXELS):
    raise BitstreamError(f"invalid image size {h}x{w} in header")
  if not np.isfinite(lmbda) or lmbda <= 0:
    raise BitstreamError(f"invalid lambda {lmbda} in header")
  payload = np.frombuffer(data, dtype="<u4", count=n_words, offset=start).astype(np.uint32)
  return Header(fp, h, w, float(lmbda), (c0, c1, c2), digest, version, colour), payload


# ---- range coding -------------------------------------------------------------------------
def _floats(weights: np.ndarray) -> np.ndarray:
  w = np.asarray(weights)
  return np.ascontiguousarray(w if w.dtype in (np.float32, np.float64) else w.astype(np.float64))


def _family():
  # perfect=False: fast, and identical on encoder and decoder by construction.
  return constriction.stream.model.Categorical(perfect=False)


def encode_streams(streams: Sequence[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  """[(symbols int32 [n], weights [n, A])...] -> uint32 words. Weights are integers as
  float32 or float64 (entropy/integer.py: rows summing to 2^24 - A, so constriction uses
  them exactly)."""
  enc = constriction.stream.queue.RangeEncoder()
  family = _family()
  for symbols, probs in streams:
    if len(symbols):
      enc.encode(np.ascontiguousarray(symbols, np.int32), family, _floats(probs))
  return enc.get_compressed()


class StreamDecoder:
  """Decodes streams in the order they were encoded; any failure is a BitstreamError."""

  def __init__(self, payload: np.ndarray):
    self._dec = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(payload, np.uint32))
    self._family = _family()

  def exhausted(self) -> bool:
    """True when the payload holds nothing after the last decoded symbol (a range coder's
    final words): extra words appended to a valid payload are then refused."""
    return bool(self._dec.maybe_exhausted())

  def decode(self, probs: np.ndarray) -> np.ndarray:
    if probs.shape[0] == 0:
      return np.zeros((0,), np.int32)
    try:
      return np.asarray(self._dec.decode(self._family, _floats(probs)), np.int32)
    except Exception as e:  # constriction raises on exhausted or inconsistent data
      raise BitstreamError(f"payload cannot be decoded ({type(e).__name__}: {e})") from None
