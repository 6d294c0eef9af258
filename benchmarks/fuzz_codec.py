"""Fuzz the .hvq decoder like a real one: mutate real files, decode, classify every outcome.

  nice -n 10 python benchmarks/fuzz_codec.py --n 100000 [--seed 0] \
      [--out benchmarks/results/fuzz_codec.json] [--checkpoint runs/tiny_cpu] \
      [--kinds hyperprior,hyperprior_off,residual_vq] [--workers 1]

Originals: real `.hvq` files of several sizes (one coarse patch up to a few hundred) and
rate settings (all coarse, mixed, all fine), made by each model kind: the hyperprior on,
the hyperprior off (static histogram) and residual VQ (two stages, a hyperprior each).
Without `--checkpoint` the models are untrained micro models made on the fly (the tiny CPU
config at configs/micro.py's sizes, with configs/ablations.py's one-field
changes); with it, the checkpoint's model is the only kind.

Mutations (`MUTATIONS`): bit flips, truncation, insertion and deletion anywhere; header
fields rewritten with the CRC recomputed (magic, version, fingerprint, size, a size
within the same padded grid, a new size with counts made to add up, lambda, counts,
symbol digest, payload length with the payload resized to match); the payload changed with
the CRC recomputed (bits, bytes, words, runs, resizing, a whole random payload); one file's
header on another file's payload; and random files (raw, after valid magic and version,
and a valid header of this model on a random payload).

Every decode must end in `BitstreamError`, or in an image identical to the original's
decode (a mutation the decoder never reads, such as lambda). Anything else is a failure:
another image, any other exception, a crash or a hang of the decoding process. Decoding
runs in worker processes (a crash or a hang is caught, counted and the worker restarted);
each keeps one loaded model per kind, so every program compiles once. The JSON has
mutations per second and the counts per outcome, per mutation kind, per model kind and
per reason the decoder gave; failures keep their bytes (base64) to reproduce them. The
exit status is 1 when any failure occurred.
"""
import argparse
import base64
import collections
import json
import multiprocessing as mp
import os
import platform
import re
import struct
import sys
import time
import traceback
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np

HEADER = struct.Struct("<4sB8sIIf3I8sI")   # entropy/bitstream.py's container header
COLOUR = struct.Struct("<12h")              # format 4's colour words, after it
HEAD = HEADER.size + COLOUR.size            # where a format-4 payload begins
FIELDS = dict(magic=(0, 4), version=(4, 1), fingerprint=(5, 8), height=(13, 4), width=(17, 4),
              lmbda=(21, 4), c0=(25, 4), c1=(29, 4), c2=(33, 4), digest=(37, 8), n_words=(45, 4),
              colour=(49, 24))
KINDS = ("hyperprior", "hyperprior_off", "residual_vq", "spatial")
# (height, width): one coarse patch; odd sizes; a few hundred fine positions
SIZES = ((16, 16), (37, 53), (64, 77), (96, 128))
# rate settings: (lambda, ratios) -> all coarse; the config's mix; all fine
SETTINGS = ((0.05, (1.0, 0.0, 0.0)), (None, None), (0.8, (0.0, 0.0, 1.0)))
FAILURES = ("other_image", "other_exception", "crash", "hang")
OUTCOMES = ("bitstream_error", "identical") + FAILURES
# how often each mutation kind is drawn: most of the work goes past the CRC
MUTATIONS = dict(bit_flip=14, truncate=7, insert=7, delete=5, header_field=22, payload_crc=30,
                 splice=5, random=10)


# ---- models and originals (worker side) ---------------------------------------------------
def model_config(kind: str):
  """configs/ablations.py's variant for `kind`, at configs/micro.py's sizes."""
  from hvq_jax.configs import ablations, micro
  variant = {"hyperprior": "base", "hyperprior_off": "hyperprior_off",
             "residual_vq": "residual_vq", "spatial": "spatial_checkerboard",
             "residual_vq_hyperprior_off": "residual_vq_hyperprior_off"}[kind]
  return micro.shrink(ablations.get_config(variant))


def random_params(cfg, seed: int):
  """Untrained params in seconds: the model's shapes (jax.eval_shape of its init, no
  compile) filled in numpy the way its initialisers do (lecun-normal kernels, zero biases,
  unit norm scales, the bottleneck's constant matrices, uniform codebooks), except the
  static index logits, drawn at random so the index streams are not uniform."""
  import functools
  import jax
  from hvq_jax.nn import model as model_lib
  m = cfg.model
  shapes = jax.eval_shape(functools.partial(model_lib.init_params, model_lib.build(m)),
                          jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  scale = 10.0 ** (1.0 / 4)   # EntropyBottleneck: init_scale 10, filters (3, 3, 3)
  cb0 = float(m.codebook_init_scale) or 1.0 / m.codebook_size
  cbs = float(m.get("rvq_init_scale", 0.0)) or cb0

  def leaf(path, a):
    names = [getattr(k, "key", str(k)) for k in path]
    name, shape = names[-1], a.shape
    if name == "kernel":
      v = rng.normal(0.0, 1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))), shape)
    elif name == "scale":
      v = np.ones(shape)
    elif name.startswith("matrix"):
      v = np.full(shape, np.log(np.expm1(1.0 / scale / shape[1])))
    elif name.startswith("bias") and name != "bias":
      v = rng.uniform(-0.5, 0.5, shape)
    elif name == "embedding":
      b = cbs if names[-2].startswith("codebook_s") else cb0
      v = rng.uniform(-b, b, shape)
    elif name == "index_bias":
      v = rng.normal(0.0, 1.0, shape)
    elif name == "mix_logit":
      v = np.full(shape, -2.0)
    else:   # biases, factors and anything new: zeros
      v = np.zeros(shape)
    return np.asarray(v, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def build_models(kinds, checkpoint: Optional[str], seed: int):
  from hvq_jax import codec
  if checkpoint:
    return {"checkpoint": codec.load_model(checkpoint)}
  return {kind: codec.CodecModel(model_config(kind), random_params(model_config(kind), seed + i))
          for i, kind in enumerate(kinds)}


def make_originals(models, sizes) -> List[dict]:
  """Every model kind compresses crops of a bundled photo at every size and setting."""
  from hvq_jax import codec, images
  photo = images.bundled_photo("coffee")
  out = []
  for kind, m in models.items():
    for j, (h, w) in enumerate(sizes):
      for lmbda, ratios in SETTINGS:
        img = photo[40 * j:40 * j + h, 60 * j:60 * j + w]
        data = codec.compress(m, img, lmbda=lmbda, ratios=ratios)
        out.append(dict(model=kind, size=f"{h}x{w}", lmbda=lmbda, ratios=ratios, data=data))
  return out


# ---- decoding one file (worker side) ------------------------------------------------------
_REASONS = [(re.compile(p), r) for p, r in [
    (r"symbol digest", "symbol_digest"),
    (r"wrong magic|expected bytes", "magic"), (r"format version", "version"),
    (r"truncated", "length"), (r"trailing data", "length"), (r"checksum mismatch", "crc"),
    (r"written by a different model", "fingerprint"), (r"invalid image size|over this model's limit", "size"),
    (r"invalid lambda", "lambda"), (r"do not add up", "counts"),
    (r"needs about", "memory_budget"), (r"payload cannot be decoded", "range_decoder"),
    (r"contradicts the header", "map_vs_counts")]]


def reason(message: str) -> str:
  for pat, r in _REASONS:
    if pat.search(message):
      return r
  return "other: " + message[:80]


def _symbols(model, data: bytes):
  from hvq_jax import codec
  header, indices, gmap = codec.decode_indices(model, data)
  return (header.height, header.width), gmap, indices


def decode_outcome(model, data: bytes, reference, pixels: bool = True) -> Tuple[str, str]:
  """(outcome, detail) of decoding `data` against the original's decode `reference`: its
  image, or with pixels=False its size and symbols (map and indices), from which the
  decoder network makes the image deterministically, so skipping it changes no outcome."""
  from hvq_jax import codec
  try:
    out = codec.decompress(model, data) if pixels else _symbols(model, data)
  except codec.BitstreamError as e:
    return "bitstream_error", reason(str(e))
  except Exception as e:   # anything else is a decoder bug
    return "other_exception", "".join(traceback.format_exception_only(type(e), e))[-400:]
  if not pixels:
    (hw, gmap, idx), (rhw, rgmap, ridx) = out, reference
    same = (hw == rhw and np.array_equal(gmap, rgmap) and idx.keys() == ridx.keys()
            and all(np.array_equal(idx[k], ridx[k]) for k in idx))
    return ("identical", "") if same else ("other_image", f"other symbols, size {hw} vs {rhw}")
  out = np.asarray(out)
  if out.shape == reference.shape and np.array_equal(out, reference):
    return "identical", ""
  diff = (f"{int(np.abs(out.astype(int) - reference.astype(int)).max())} max abs difference"
          if out.shape == reference.shape else "")
  return "other_image", f"decoded {out.shape} {out.dtype} vs original {reference.shape} {diff}"


class Decoder:
  """One loaded model per kind, the originals and their reference decodes (compiled once)."""

  def __init__(self, kinds, sizes, checkpoint, seed, pixels=True):
    t = time.perf_counter()
    from hvq_jax import codec
    self.pixels = pixels
    self.models = build_models(kinds, checkpoint, seed)
    self.originals = make_originals(self.models, sizes)
    ref = codec.decompress if pixels else _symbols
    self.references = [ref(self.models[o["model"]], o["data"]) for o in self.originals]
    self.setup_s = time.perf_counter() - t

  def __call__(self, orig: int, data: bytes) -> Tuple[str, str]:
    return decode_outcome(self.models[self.originals[orig]["model"]], data,
                          self.references[orig], self.pixels)


def _worker(conn, kinds, sizes, checkpoint, seed, platform_name):
  if platform_name:
    os.environ["JAX_PLATFORMS"] = platform_name
  try:
    dec = Decoder(kinds, sizes, checkpoint, seed)
  except BaseException as e:
    conn.send(("setup_error", "".join(traceback.format_exception(e))))
    return
  conn.send(("ready", dict(setup_s=dec.setup_s, originals=[
      {k: v for k, v in o.items()} for o in dec.originals],
      fingerprints={k: m.fingerprint.hex() for k, m in dec.models.items()})))
  while True:
    msg = conn.recv()
    if msg is None:
      return
    for i, orig, data in msg:
      t = time.perf_counter()
      outcome, detail = dec(orig, data)
      conn.send((i, outcome, detail, time.perf_counter() - t))


# ---- mutations (parent side) ----------------------------------------------------------------
def with_crc(body: bytes) -> bytes:
  return body + struct.pack("<I", zlib.crc32(body))


def _set(data: bytes, field: str, value: bytes) -> bytes:
  off, size = FIELDS[field]
  assert len(value) == size
  return data[:off] + value + data[off + size:]


def _u32(v: int) -> bytes:
  return struct.pack("<I", v & 0xFFFFFFFF)


def _boundary_u32(rng, v: int) -> int:
  return int(rng.choice([0, 1, v - 1, v + 1, 2 * v, v // 2, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 16,
                         int(rng.integers(0, 1 << 32))]))


def _padded(n: int) -> int:
  return -(-n // 16) * 16


def mutate_header(rng, data: bytes, coarse_stride: int = 16) -> Tuple[str, bytes]:
  """Rewrite one header field (or a consistent group of them); CRC recomputed."""
  body = data[:-4]
  f = HEADER.unpack_from(body)
  h, w, counts, n_words = f[3], f[4], list(f[6:9]), f[10]
  what = str(rng.choice(["magic", "version", "fingerprint", "height", "width", "size_same_pad",
                         "size_consistent", "lmbda", "lmbda_valid", "counts", "counts_moved",
                         "digest", "n_words", "n_words_resized", "colour"]))
  if what in ("magic", "fingerprint", "digest", "colour"):
    off, size = FIELDS[what]
    v = bytearray(body[off:off + size])
    v[int(rng.integers(size))] ^= 1 << int(rng.integers(8))
    if rng.random() < 0.3:
      v = bytearray(rng.bytes(size))
    body = _set(body, what, bytes(v))
  elif what == "version":
    body = _set(body, "version", bytes([int(rng.choice([0, 1, 2, 3, 4, 5, 255, int(rng.integers(256))]))]))
  elif what in ("height", "width"):
    body = _set(body, what, _u32(_boundary_u32(rng, h if what == "height" else w)))
  elif what == "size_same_pad":   # same padded grid: counts still add up, symbols identical
    hp, wp = _padded(h), _padded(w)
    nh, nw = int(rng.integers(hp - 15, hp + 1)), int(rng.integers(wp - 15, wp + 1))
    if (nh, nw) == (h, w):
      nh = hp - 15 if h != hp - 15 else hp
    body = _set(_set(body, "height", _u32(nh)), "width", _u32(nw))
  elif what == "size_consistent":   # another size, counts made to add up to its patches
    nh, nw = int(rng.integers(1, 400)), int(rng.integers(1, 400))
    n = (_padded(nh) // coarse_stride) * (_padded(nw) // coarse_stride)
    cut = np.sort(rng.integers(0, n + 1, 2))
    c = [int(cut[0]), int(cut[1] - cut[0]), int(n - cut[1])]
    body = _set(_set(body, "height", _u32(nh)), "width", _u32(nw))
    for i in range(3):
      body = _set(body, f"c{i}", _u32(c[i]))
  elif what == "lmbda":
    v = rng.choice([0.0, -1.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38,
                    struct.unpack("<f", rng.bytes(4))[0]])
    body = _set(body, "lmbda", struct.pack("<f", v))
  elif what == "lmbda_valid":   # the decoder never reads lambda: the same image
    body = _set(body, "lmbda", struct.pack("<f", float(np.exp(rng.uniform(-6, 6)))))
  elif what == "counts":
    i = int(rng.integers(3))
    body = _set(body, f"c{i}", _u32(_boundary_u32(rng, counts[i])))
  elif what == "counts_moved":   # the same sum: read_header accepts it
    src, dst = rng.choice(3, 2, replace=False)
    k = int(rng.integers(1, counts[src] + 1)) if counts[src] else 0
    if k == 0:
      src, dst = dst, src
      k = int(rng.integers(1, counts[src] + 1)) if counts[src] else 0
    counts[src] -= k
    counts[dst] += k
    for i in range(3):
      body = _set(body, f"c{i}", _u32(counts[i]))
  elif what == "n_words":
    body = _set(body, "n_words", _u32(_boundary_u32(rng, n_words)))
  else:   # n_words_resized: the length checks pass, the payload is shorter or longer
    k = int(rng.integers(0, 2 * n_words + 3))
    payload = body[HEAD:]
    payload = payload[:4 * k] + rng.bytes(max(0, 4 * k - len(payload)))
    body = _set(body[:HEAD], "n_words", _u32(k)) + payload
  return what, with_crc(body)


def mutate_payload(rng, data: bytes) -> Tuple[str, bytes]:
  """Change the payload and recompute the CRC (the range decoder and digest must cope)."""
  head, payload = bytearray(data[:HEAD]), bytearray(data[HEAD:-4])
  n = len(payload)
  what = str(rng.choice(["bits", "bytes", "word", "run", "swap", "shorter", "longer",
                         "random"]))
  if n == 0:
    what = "longer"
  if what == "bits":
    for _ in range(int(rng.integers(1, 5))):
      payload[int(rng.integers(n))] ^= 1 << int(rng.integers(8))
  elif what == "bytes":
    for _ in range(int(rng.integers(1, 5))):
      payload[int(rng.integers(n))] = int(rng.integers(256))
  elif what == "word":
    i = 4 * int(rng.integers(n // 4))
    payload[i:i + 4] = rng.bytes(4)
  elif what == "run":
    i = 4 * int(rng.integers(n // 4))
    k = 4 * int(rng.integers(1, n // 4 - i // 4 + 1))
    payload[i:i + k] = bytes([int(rng.choice([0, 255]))]) * k if rng.random() < 0.5 else rng.bytes(k)
  elif what == "swap" and n >= 8:
    i, j = 4 * rng.choice(n // 4, 2, replace=False)
    payload[i:i + 4], payload[j:j + 4] = payload[j:j + 4], payload[i:i + 4]
  elif what in ("shorter", "swap"):
    what = "shorter"
    payload = payload[:4 * int(rng.integers(0, n // 4))]
  elif what == "longer":
    payload = payload + rng.bytes(4 * int(rng.integers(1, 9)))
  else:
    payload = bytearray(rng.bytes(n))
  head[FIELDS["n_words"][0]:FIELDS["n_words"][0] + 4] = _u32(len(payload) // 4)
  return what, with_crc(bytes(head + payload))


def mutate(rng, data: bytes, other: bytes) -> Tuple[str, str, bytes]:
  """One mutation of `data` (`other`: another original of the same model) ->
  (kind, variant, bytes); the bytes always differ from `data`."""
  kinds, weights = zip(*MUTATIONS.items())
  for _ in range(100):
    kind = str(rng.choice(kinds, p=np.asarray(weights) / sum(weights)))
    d = bytearray(data)
    if kind == "bit_flip":
      k = int(rng.choice([1, 1, 2, 3, 8]))
      for _ in range(k):
        d[int(rng.integers(len(d)))] ^= 1 << int(rng.integers(8))
      variant, out = f"{k} bits", bytes(d)
    elif kind == "truncate":
      variant, out = "", bytes(d[:int(rng.integers(len(d)))])
    elif kind == "insert":
      k = int(rng.integers(1, 17))
      i = int(rng.integers(len(d) + 1))
      variant, out = "", bytes(d[:i]) + rng.bytes(k) + bytes(d[i:])
    elif kind == "delete":
      k = int(rng.integers(1, 17))
      i = int(rng.integers(len(d)))
      variant, out = "", bytes(d[:i] + d[i + k:])
    elif kind == "header_field":
      variant, out = mutate_header(rng, data)
    elif kind == "payload_crc":
      variant, out = mutate_payload(rng, data)
    elif kind == "splice":   # this header (digest included) on another file's payload
      n = len(other) - HEAD - 4
      head = bytearray(data[:HEAD])
      head[FIELDS["n_words"][0]:FIELDS["n_words"][0] + 4] = _u32(n // 4)
      variant, out = "", with_crc(bytes(head) + other[HEAD:-4])
    else:
      variant = str(rng.choice(["raw", "magic_version", "valid_header", "valid_header_digest"]))
      n = int(rng.integers(0, 600))
      if variant == "raw":
        out = rng.bytes(n)
      elif variant == "magic_version":
        out = with_crc(b"HVQC" + bytes([int(rng.choice([2, 3, 4]))]) + rng.bytes(n))
      else:   # this model's valid header on a random payload (digest random or the original's)
        head = bytearray(data[:HEAD])
        if variant == "valid_header":
          head[FIELDS["digest"][0]:FIELDS["digest"][0] + 8] = rng.bytes(8)
        head[FIELDS["n_words"][0]:FIELDS["n_words"][0] + 4] = _u32(n // 4)
        out = with_crc(bytes(head) + rng.bytes(4 * (n // 4)))
    if out != data:
      return kind, variant, out
  raise RuntimeError("no mutation changed the file")


# ---- the loop (parent side) -------------------------------------------------------------------
class _Pool:
  """Worker processes that decode; restarted after a crash or a hang."""

  def __init__(self, workers, kinds, sizes, checkpoint, seed, platform_name, hang_s,
               target=None):
    self.args = (kinds, sizes, checkpoint, seed, platform_name)
    self.target = target or _worker
    self.hang_s = hang_s
    self.ctx = mp.get_context("spawn")
    self.procs = [None] * workers
    self.info = None
    self.setup_s = []
    for i in range(workers):
      self._start(i)

  def _start(self, i):
    parent, child = self.ctx.Pipe()
    p = self.ctx.Process(target=self.target, args=(child,) + self.args, daemon=True)
    p.start()
    child.close()
    if not parent.poll(1800):
      raise RuntimeError("worker did not start within 30 minutes")
    tag, info = parent.recv()
    if tag != "ready":
      raise RuntimeError(f"worker setup failed:\n{info}")
    self.info = self.info or info
    self.setup_s.append(info["setup_s"])
    self.procs[i] = (p, parent)

  def _stop(self, i):
    p, conn = self.procs[i]
    p.kill()
    p.join()
    conn.close()

  def run(self, i, batch):
    """Decode a batch [(index, original, bytes)] on worker i -> [(index, outcome, detail, s)]."""
    p, conn = self.procs[i]
    conn.send(batch)
    out = []
    for item in batch:
      try:
        ready = conn.poll(self.hang_s)
      except (EOFError, OSError):
        ready = True
      if ready:
        try:
          out.append(conn.recv())
          continue
        except (EOFError, OSError):   # the pipe closed: the worker died on this item
          p.join(10)
          outcome, detail = "crash", f"worker exit code {p.exitcode}"
      else:
        outcome, detail = "hang", f"worker stuck over {self.hang_s:g} s"
      self._stop(i)
      out.append((item[0], outcome, detail, 0.0))
      self._start(i)
      if len(out) < len(batch):
        out.extend(self.run(i, batch[len(out):]))
      return out
    return out

  def close(self):
    for p, conn in self.procs:
      try:
        conn.send(None)
      except (OSError, BrokenPipeError):
        pass
      p.join(10)
      if p.is_alive():
        p.kill()


def run(n: int, seed: int = 0, kinds=KINDS, sizes=SIZES, checkpoint: Optional[str] = None,
        workers: int = 1, platform_name: str = "cpu", hang_s: float = 300.0,
        batch: int = 64, progress: bool = False, keep_failures: int = 50,
        pixels: bool = True) -> dict:
  """Fuzz `n` mutations; workers=0 decodes in this process (no crash isolation);
  pixels=False (in-process only) compares symbols instead of images (`decode_outcome`)."""
  rng = np.random.default_rng(seed)
  t0 = time.perf_counter()
  if workers == 0:
    dec = Decoder(kinds, sizes, checkpoint, seed, pixels)
    originals = dec.originals
    info = dict(setup_s=dec.setup_s, fingerprints={k: m.fingerprint.hex()
                                                   for k, m in dec.models.items()})
    setup_s = [dec.setup_s]

    def decode_batch(_, items):
      out = []
      for i, orig, data in items:
        t = time.perf_counter()
        o, d = dec(orig, data)
        out.append((i, o, d, time.perf_counter() - t))
      return out
    pool = None
  else:
    pool = _Pool(workers, kinds, sizes, checkpoint, seed, platform_name, hang_s)
    info, originals, setup_s = pool.info, pool.info["originals"], pool.setup_s
    decode_batch = pool.run
  by_model = collections.defaultdict(list)
  for j, o in enumerate(originals):
    by_model[o["model"]].append(j)
  t_setup = time.perf_counter() - t0

  outcomes = collections.Counter()
  per_kind = collections.defaultdict(collections.Counter)
  per_variant = collections.defaultdict(collections.Counter)
  per_model = collections.defaultdict(collections.Counter)
  per_size = collections.defaultdict(collections.Counter)
  reasons = collections.Counter()
  reasons_per_kind = collections.defaultdict(collections.Counter)
  failures, slowest = [], []
  decode_s = 0.0
  t1 = time.perf_counter()
  done = 0
  last = t1
  queues = [[] for _ in range(max(workers, 1))]
  meta = {}

  def account(results):
    nonlocal decode_s
    for i, outcome, detail, s in results:
      kind, variant, orig, data = meta.pop(i)
      o = originals[orig]
      outcomes[outcome] += 1
      per_kind[kind][outcome] += 1
      per_variant[f"{kind}/{variant}" if variant else kind][outcome] += 1
      per_model[o["model"]][outcome] += 1
      per_size[o["size"]][outcome] += 1
      decode_s += s
      if outcome == "bitstream_error":
        reasons[detail] += 1
        reasons_per_kind[kind][detail] += 1
      slowest.append((s, kind, variant, o["model"], o["size"]))
      slowest.sort(reverse=True)
      del slowest[5:]
      if outcome in FAILURES and len(failures) < keep_failures:
        failures.append(dict(index=i, mutation=kind, variant=variant, model=o["model"],
                             original=orig, size=o["size"], outcome=outcome, detail=detail,
                             data_base64=base64.b64encode(data).decode()))

  w = 0
  for i in range(n):
    model = originals[int(rng.integers(len(originals)))]["model"]
    js = by_model[model]
    orig = js[int(rng.integers(len(js)))]
    other = js[int(rng.integers(len(js)))]
    if other == orig and len(js) > 1:
      other = js[(js.index(orig) + 1) % len(js)]
    kind, variant, data = mutate(rng, originals[orig]["data"], originals[other]["data"])
    meta[i] = (kind, variant, orig, data)
    queues[w].append((i, orig, data))
    if len(queues[w]) >= batch or i == n - 1:
      account(decode_batch(w, queues[w]))
      done += len(queues[w])
      queues[w] = []
      w = (w + 1) % len(queues)
      if progress and time.perf_counter() - last > 30:
        last = time.perf_counter()
        rate = done / (last - t1)
        print(f"{done}/{n} mutations, {rate:.0f}/s, {dict(outcomes)}", file=sys.stderr,
              flush=True)
  for q in range(len(queues)):
    if queues[q]:
      account(decode_batch(q, queues[q]))
  if pool is not None:
    pool.close()
  elapsed = time.perf_counter() - t1
  import jax
  return dict(
      n=n, seed=seed, model_kinds=list(info["fingerprints"]), checkpoint=checkpoint,
      sizes=[f"{h}x{w}" for h, w in sizes], workers=workers, compared="pixels" if pixels or
      workers else "symbols",
      originals=[dict(model=o["model"], size=o["size"], lmbda=o["lmbda"], ratios=o["ratios"],
                      bytes=len(o["data"])) for o in originals],
      fingerprints=info["fingerprints"], setup_s=t_setup, worker_setup_s=setup_s,
      elapsed_s=elapsed, mutations_per_s=n / elapsed if elapsed else None,
      decode_s_mean=decode_s / max(n, 1),
      outcomes={k: outcomes.get(k, 0) for k in OUTCOMES},
      failures_total=sum(outcomes.get(k, 0) for k in FAILURES),
      per_mutation={k: dict(per_kind[k]) for k in MUTATIONS if k in per_kind},
      per_variant={k: dict(v) for k, v in sorted(per_variant.items())},
      per_model={k: dict(v) for k, v in per_model.items()},
      per_size={k: dict(v) for k, v in per_size.items()},
      reasons=dict(reasons.most_common()),
      reasons_per_mutation={k: dict(v.most_common()) for k, v in reasons_per_kind.items()},
      slowest=[dict(decode_s=s, mutation=k, variant=v, model=m, size=sz)
               for s, k, v, m, sz in slowest],
      failures=failures,
      machine=dict(python=platform.python_version(), jax=jax.__version__,
                   platform=platform.platform(), cpus=os.cpu_count(),
                   backend=platform_name or "default"),
  )


def replay(path: str) -> int:
  """Decode the failures saved in a result JSON again, in this process, with tracebacks."""
  with open(path) as f:
    r = json.load(f)
  if not r["failures"]:
    print(f"{path}: no failures to replay")
    return 0
  sizes = [tuple(int(v) for v in s.split("x")) for s in r["sizes"]]
  dec = Decoder(r["model_kinds"] if not r["checkpoint"] else (), sizes, r["checkpoint"],
                r["seed"])
  for fail in r["failures"]:
    data = base64.b64decode(fail["data_base64"])
    model = dec.models[fail["model"]]
    print(f"--- #{fail['index']} {fail['mutation']}/{fail['variant']} on {fail['model']} "
          f"{fail['size']}: was {fail['outcome']}")
    try:
      from hvq_jax import codec
      out = codec.decompress(model, data)
      print(f"decoded {out.shape}; identical to the original: "
            f"{np.array_equal(out, dec.references[fail['original']])}")
    except Exception:
      traceback.print_exc()
  return 1


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=100_000, help="mutations to decode")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="JSON path (default benchmarks/results/"
                  "fuzz_codec_n{n}_seed{seed}.json)")
  ap.add_argument("--checkpoint", default="", help="a training workdir; default: untrained "
                  "micro models of every --kinds, made on the fly")
  ap.add_argument("--kinds", default=",".join(KINDS),
                  help=f"model kinds without --checkpoint ({', '.join(KINDS)}, "
                       "residual_vq_hyperprior_off)")
  ap.add_argument("--sizes", default=",".join(f"{h}x{w}" for h, w in SIZES))
  ap.add_argument("--workers", type=int, default=1,
                  help="decoding processes (0: in this process, no crash isolation)")
  ap.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the decoders ('' = any)")
  ap.add_argument("--hang-s", type=float, default=300.0,
                  help="seconds one decode may take before it counts as a hang")
  ap.add_argument("--replay", default="", help="a result JSON: decode its failures again "
                  "(same models: its kinds, sizes, seed, checkpoint) and print tracebacks")
  a = ap.parse_args(argv)
  if a.replay:
    return replay(a.replay)
  sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
  kinds = [k for k in a.kinds.split(",") if k]
  if a.platform:
    os.environ["JAX_PLATFORMS"] = a.platform
  result = run(a.n, a.seed, kinds, sizes, a.checkpoint or None, a.workers, a.platform,
               a.hang_s, progress=True)
  result["command"] = "python benchmarks/fuzz_codec.py " + " ".join(
      argv if argv is not None else sys.argv[1:])
  out = a.out or f"benchmarks/results/fuzz_codec_n{a.n}_seed{a.seed}.json"
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  summary = {k: result[k] for k in ("n", "elapsed_s", "mutations_per_s", "outcomes",
                                     "per_mutation", "reasons")}
  print(json.dumps(summary, indent=1))
  print(f"wrote {out}", file=sys.stderr)
  if result["failures_total"]:
    print(f"FAILED: {result['failures_total']} mutations decoded to another image, raised "
          f"another exception, crashed or hung; their bytes are in {out}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
