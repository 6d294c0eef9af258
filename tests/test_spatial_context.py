"""hyperprior.spatial: each granularity's indices are coded in interleaved passes, each pass's
prior also reading the entries of earlier passes. The pass patterns and contexts follow
their definition, the integer twin follows the float prior pass by pass, the float rate
model prices what the file codes, PyTorch prices and decodes the same files, and files of
models without a spatial context keep format 2 (files written before format 3 decode)."""
import dataclasses
import hashlib
import json
import zlib

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from hvq_jax import codec, colour, images, layout
from hvq_jax.codec import coder, profile
from hvq_jax.configs import upgrade
from hvq_jax.entropy import bitstream, integer, streams
from hvq_jax.entropy.bitstream import BitstreamError
from hvq_jax.layout import GRANULARITIES
from hvq_jax.nn import model as model_lib
from tests.conftest import micro_config

RATIOS = (0.1, 0.4, 0.5)


def _config(context="coarser", spatial="checkerboard"):
  c = micro_config()
  c.model.hyperprior.context = context
  c.model.hyperprior.spatial = spatial
  return c


def _params(c, seed=3, scale=2.0):
  """Init params with the context paths scaled: trained-like, so that a wiring mistake
  shows (the init's small weights would hide it), and not so large that mu leaves the
  integer path's range."""
  m = model_lib.build(c.model)
  p = model_lib.init_params(m, jax.random.PRNGKey(seed))
  return m, jax.tree_util.tree_map_with_path(
      lambda k, v: v * scale if "context" in jax.tree_util.keystr(k) else v, p)


@pytest.fixture(scope="module", params=[("coarser", "checkerboard"), ("none", "quad")])
def sp_model(request):
  c = _config(*request.param)
  m, params = _params(c)
  return c, m, params, codec.CodecModel(c, params)


# ---- the definitions -------------------------------------------------------------------------
_QUAD = {(0, 0): 0, (1, 1): 1, (0, 1): 2, (1, 0): 3}


@pytest.mark.parametrize("n", [1, 2, 4])
def test_pass_patterns(n):
  """Checkerboard: (y + x) even first; quad: (0,0), (1,1), (0,1), (1,0) of each 2x2 cell.
  Every second-pass position of the checkerboard has its four direct neighbours in the
  first pass; the quad's last pass has all eight neighbours in earlier passes."""
  h, w = 5, 7
  p = layout.pass_map(h, w, n)
  for y in range(h):
    for x in range(w):
      want = 0 if n == 1 else (y + x) % 2 if n == 2 else _QUAD[(y % 2, x % 2)]
      assert p[y, x] == want
  assert sorted(set(p.reshape(-1).tolist())) == list(range(n))
  if n == 2:
    for y in range(1, h - 1):
      for x in range(1, w - 1):
        if p[y, x] == 1:
          assert all(p[y + dy, x + dx] == 0 for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)))
  if n == 4:
    for y in range(1, h - 1):
      for x in range(1, w - 1):
        if p[y, x] == 3:
          assert (p[y - 1:y + 2, x - 1:x + 2] < 3).sum() == 8


def test_spatial_map_reads_only_earlier_passes():
  """A numpy reference from the definition: at every position, the entry and a one of each
  position sent in an earlier pass, zeros elsewhere; the entries of this and later passes
  change nothing."""
  rng = np.random.default_rng(0)
  h, w, d, k, bits = 6, 5, 3, 7, 12
  entries = rng.integers(-900, 900, (k, d))
  mask = rng.random((h, w)) < 0.7
  idx = rng.integers(0, k, (h, w))
  for n in (2, 4):
    passes = layout.pass_map(h, w, n)
    for p in range(1, n):
      got = integer.spatial_map(entries, idx, mask, passes, p, bits)
      assert got.shape == (h, w, d + 1)
      for y in range(h):
        for x in range(w):
          want = np.zeros(d + 1, np.int64)
          if mask[y, x] and passes[y, x] < p:
            want[:d], want[d] = entries[idx[y, x]], 1 << bits
          np.testing.assert_array_equal(got[y, x], want)
      later = np.where(passes >= p, (idx + 1) % k, idx)
      np.testing.assert_array_equal(got, integer.spatial_map(entries, later, mask, passes, p, bits))


def test_stream_plan_and_format_version():
  c = _config()
  plan = layout.stream_plan(c.model, (1, 2, 3))
  ys = [(s.branch, s.part) for s in plan if s.kind == "y"]
  assert ys == [(g, p) for g in GRANULARITIES for p in (0, 1)]
  assert layout.payload_version(c.model) == 3
  c = _config(spatial="quad")
  assert [s.part for s in layout.stream_plan(c.model, (0, 2, 3)) if s.kind == "y"] == [0, 1, 2, 3] * 2
  c = _config(spatial="none")
  assert [s.part for s in layout.stream_plan(c.model, (1, 2, 3))] == [0] * 7
  assert layout.payload_version(c.model) == 2


def test_spatial_needs_one_stage_the_hyperprior_and_a_known_pattern():
  for edit in (lambda c: c.model.update(rvq_stages=2),
               lambda c: c.model.hyperprior.update(enabled=False, context="none"),
               lambda c: c.model.hyperprior.update(spatial="serial")):
    c = _config(context="none")
    edit(c)
    with pytest.raises(model_lib.ConfigError, match="spatial"):
      model_lib.validate(c.model)


# ---- integer twin --------------------------------------------------------------------------
def _float_spatial(m, params, g, ent, idx, mask):
  q = jnp.asarray(ent[idx][None], jnp.float32)
  return m.apply({"params": params}, g, q, jnp.asarray(mask[None]),
                 method=model_lib.HVQ.spatial_context)


def test_integer_prior_follows_the_float_one_pass_by_pass(sp_model):
  c, m, params, cm = sp_model
  tabs = cm.tables
  ent = np.asarray(m.apply({"params": params}, "fine", method=model_lib.HVQ.codebook_entries),
                   np.float64)
  rng = np.random.default_rng(1)
  strides, nd = tuple(c.model.strides), c.model.hyperprior.num_down
  n = layout.num_passes(c.model)
  gmap = rng.integers(0, 3, (1, 3, 4))
  masks = layout.sent_masks(gmap, strides)
  idx = {g: rng.integers(0, c.model.codebook_size, mk.shape[1:]) for g, mk in masks.items()}
  q = {g: jnp.asarray(ent[idx[g]][None], jnp.float32) for g in idx}
  for g in GRANULARITIES:
    t, grid, mask = tabs[g], masks[g].shape[1:], masks[g][0]
    assert len(t.spatial) == 2 and t.ctx_entries is not None
    ctx_i = ctx_f = None
    if c.model.hyperprior.context == "coarser":
      ctx_i = integer.context_map(g, {k: v[0] for k, v in masks.items()}, idx,
                                  {k: tabs[k].ctx_entries for k in tabs}, strides, t.ctx_bits)
      ctx_f = m.apply({"params": params}, g, q, {k: jnp.asarray(v) for k, v in masks.items()},
                      method=model_lib.HVQ.prior_context)
    sp_f = _float_spatial(m, params, g, ent, idx[g], mask)
    passes = layout.pass_map(*grid, n)
    np.testing.assert_array_equal(sp_f[0], passes)
    z = rng.integers(-6, 7, layout.z_grid(*grid, nd) + (c.model.hyperprior.latent_channels,))
    mu, sigma = jax.device_get(m.apply({"params": params}, g, jnp.asarray(z[None], jnp.float32),
                                       grid, ctx_f, sp_f, method=model_lib.HVQ.prior))
    feats = integer.features(t, z, grid, ctx_i)
    mu0, _ = integer.head(t, feats, grid)
    for p in range(n):
      sp_i = None if p == 0 else integer.spatial_map(t.ctx_entries, idx[g], mask, passes, p,
                                                     t.ctx_bits)
      if p:   # the integer map is the float one in fixed point
        np.testing.assert_array_equal(sp_i, np.rint(np.asarray(sp_f[1][p - 1, 0]) * 2.0 ** t.ctx_bits))
      mu_q, ls_q = integer.head(t, feats, grid, sp_i)
      here = passes == p
      lim = 2.0 ** (14 - t.mu_bits)
      mu_ref = np.clip(mu[0][here], -lim, lim)
      err = np.abs(mu_q[here] / 2.0 ** t.mu_bits - mu_ref).max()
      assert err <= 5e-3 * np.abs(mu).max() + 2.0 ** -t.mu_bits, (g, p, err)
      ls_ref = np.clip(np.log(sigma[0][here]), t.ls_lo / 256, t.ls_hi / 256)
      assert np.abs(ls_q[here] / 256.0 - ls_ref).max() <= 3e-3 * np.abs(ls_ref).max() + 1 / 256
      if p and mask[here].any():   # and the earlier passes matter
        assert not np.array_equal(mu_q[here & mask], mu0[here & mask])
  with pytest.raises(integer.IntegerModelError, match="spatial"):
    integer.head(dataclasses.replace(tabs["fine"], spatial=()), feats, grid, sp_i)


# ---- files ---------------------------------------------------------------------------------
def _estimate(m, params, img, ratios=RATIOS, lmbda=0.2):
  x = jnp.asarray(img, jnp.float32)[None] / 127.5 - 1
  out = jax.device_get(m.apply({"params": params}, x, jnp.full((1,), lmbda),
                               jnp.asarray(ratios, jnp.float32)))
  return {k: float(v[0]) for k, v in out["bits"].items()}, x


def test_files_round_trip_and_cost_what_the_rate_model_estimates(sp_model):
  """The encoder's symbols come back; the training rate model (float, every index priced by
  its own pass's prior) is within 1% of the file's exact code lengths, stream by stream,
  and of the file's size; pricing every index with the first pass's prior is not."""
  c, m, params, cm = sp_model
  img = images.bundled_photo("chelsea")[:128, :160]
  data, st = profile.compress(cm, img, lmbda=0.2, ratios=RATIOS)
  assert data[4] == 4 and layout.payload_version(c.model) == 3
  _, idx, gmap = codec.decode_indices(cm, data)
  enc = codec.encode_latents(cm, img, 0.2, RATIOS)
  masks = layout.sent_masks(np.asarray(gmap), tuple(c.model.strides))
  np.testing.assert_array_equal(gmap, enc["gmap"])
  for g in GRANULARITIES:
    np.testing.assert_array_equal(idx[g][masks[g]], np.asarray(enc["indices"][g])[masks[g]])
    assert len(st["pass_bits"][g]) == layout.num_passes(c.model)
  est, _ = _estimate(m, params, img)
  for k in ("y_coarse", "y_medium", "y_fine", "z", "map"):
    assert abs(est[k] - st["bits"][k]) <= 0.01 * st["bits"][k] + 1, (k, est[k], st["bits"][k])
  file_bits = 8 * (len(data) - bitstream.CONTAINER_BYTES)
  assert abs(sum(est.values()) - file_bits) <= 0.01 * file_bits
  # the same params priced without the later passes' context: clearly another rate
  c1 = _config(c.model.hyperprior.context, "none")
  one_pass, _ = _estimate(model_lib.build(c1.model), params, img)
  y = lambda b: sum(v for k, v in b.items() if k.startswith("y_"))
  assert abs(y(one_pass) - y(st["bits"])) > 0.03 * y(st["bits"]), (y(one_pass), y(st["bits"]))


def test_pytorch_prices_and_decodes_the_same_files(sp_model, tmp_path):
  torch = pytest.importorskip("torch")
  from hvq_jax.interop import export, torch_model
  c, m, params, cm = sp_model
  img = images.bundled_photo("coffee")[:64, :80]
  path = str(tmp_path / "sp.safetensors")
  export.save_torch(params, c, path, coding=cm)
  net = torch_model.from_safetensors(path)
  # the PyTorch side codes with the export's integer tables: the codec's, array for array
  tables, fp, codec_cfg = export.load_coding(path)
  assert fp == cm.fingerprint and set(tables) == set(cm.tables)
  for k, t in tables.items():
    mine = cm.tables[k].arrays()
    assert set(t.arrays()) == set(mine) and any(n.startswith("spatial") for n in mine)
    for n, a in t.arrays().items():
      np.testing.assert_array_equal(a, mine[n], err_msg=f"{k} {n}")
  for ratios in (RATIOS, (0.0, 0.5, 0.5), (1.0, 0.0, 0.0)):
    est, x = _estimate(m, params, img, ratios)
    out = net(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), 0.2, ratios)
    for k, v in est.items():
      np.testing.assert_allclose(out["bits"][k].numpy(), v, rtol=1e-4, atol=1e-3, err_msg=k)
    data = codec.compress(cm, img, lmbda=0.2, ratios=ratios)
    # every pass's indices and the map decode exactly as on the JAX side
    header, payload, hw = streams.read_header(data, fp, net.cfg, codec_cfg["max_pixels"])
    gmap_t, idx_t = streams.decode(tables, net.cfg, int(codec_cfg["z_range"]), header,
                                   payload, hw)
    _, idx_j, gmap_j = codec.decode_indices(cm, data)
    np.testing.assert_array_equal(gmap_t, gmap_j)
    for k in idx_j:
      np.testing.assert_array_equal(idx_t[k], idx_j[k], err_msg=k)
    # pixels: one float decoder in PyTorch, one in XLA, within one level (times the
    # gains of the file's colour transform)
    got = torch_model.decompress(net, data)
    assert np.abs(got.astype(int) - codec.decompress(cm, data).astype(int)).max() <= \
        colour.bound(bitstream.unpack(data)[0].colour)


def _with_crc(body: bytes) -> bytes:
  return body + zlib.crc32(body).to_bytes(4, "little")


class _Altering(streams.Recorder):
  """An encoder that range-codes stream `target` with one symbol changed; what follows is
  coded consistently with it."""
  target = 0

  def code(self, stream, weights, where=None):
    i = len(self.streams)
    sym = super().code(stream, weights, where).copy()
    if i == self.target:
      sym[len(sym) // 2] = (sym[len(sym) // 2] + 1) % weights.shape[1]
      self.streams[i] = (sym, weights)
    return sym


def test_the_digest_covers_every_pass(sp_model, monkeypatch):
  """Another valid range coding of any one pass's indices under the file's header and digest
  is refused."""
  c, m, params, cm = sp_model
  img = images.bundled_photo("coffee")[:29, :45]
  settings = (0.2, (0.3, 0.3, 0.4))
  plain, rec = coder.code_image(cm, img, *settings)
  assert len(rec.names) == 1 + 3 + 3 * layout.num_passes(c.model)
  targets = [i for i, (s, (sym, _)) in enumerate(zip(rec.names, rec.streams))
             if s.kind == "y" and len(sym)]
  hit = {(rec.names[i].branch, rec.names[i].part) for i in targets}
  assert {(g, p) for g in ("medium", "fine") for p in range(layout.num_passes(c.model))} <= hit
  off, size = 37, 8                                  # the symbol digest's header field
  monkeypatch.setattr(streams, "Recorder", _Altering)
  for target in targets:
    monkeypatch.setattr(_Altering, "target", target)
    other, _ = coder.code_image(cm, img, *settings)
    start = bitstream.container_bytes() - 4            # the payload
    assert other[start:-4] != plain[start:-4]
    forged = _with_crc(other[:off] + plain[off:off + size] + other[off + size:-4])
    with pytest.raises(BitstreamError, match="symbol digest"):
      codec.decompress(cm, forged)


# ---- format versions -----------------------------------------------------------------------
def _old_fingerprint(params, stored_model: dict, codec_cfg: dict) -> bytes:
  """The model fingerprint as format 2's writers computed it, from a stored config that
  has no `hyperprior.spatial` (written out here, not calling the codec): compute settings
  left out, and `dec_mid_attn` at its earlier value."""
  cfg = {k: v for k, v in stored_model.items()
         if k not in ("dtype", "remat", "rate_chunk", "attn_chunk")
         and not (k == "dec_mid_attn" and v is True)}
  h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
  h.update(json.dumps(dict(integer=1, z_range=int(codec_cfg["z_range"]),
                           weight_bits=int(codec_cfg["weight_bits"])), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.digest()[:8]


def test_files_of_format_2_still_decode_and_versions_are_checked(sp_model):
  """A checkpoint written before hyperprior.spatial existed (its stored config lacks the
  field) keeps its fingerprint and writes format 2 with the one-stream-per-branch payload,
  so its earlier files decode; a file whose version is not its model's is refused by
  version."""
  old = micro_config()
  old.model.hyperprior.context = "coarser"
  stored = old.to_dict()
  del stored["model"]["hyperprior"]["spatial"]
  cfg = upgrade.upgrade(stored)
  assert cfg.model.hyperprior.spatial == "none"
  _, params = _params(cfg, seed=4)
  cm_old = codec.CodecModel(cfg, params)
  assert cm_old.fingerprint == _old_fingerprint(params, stored["model"], stored["codec"])
  img = images.bundled_photo("coffee")[:40, :56]
  # a file of format 2 (before the colour transform: the payload, the digest of its
  # symbols alone) decodes, to the networks' pixels
  _, rec = coder.code_image(cm_old, img, 0.2, (0.3, 0.3, 0.4), colour=False)
  data = _legacy(codec.compress(cm_old, img, lmbda=0.2, ratios=(0.3, 0.3, 0.4), colour=False),
                 2, rec)
  assert data[4] == 2
  assert bitstream.unpack(data)[0].version == 2
  np.testing.assert_array_equal(codec.decompress(cm_old, data), codec.decompress(
      cm_old, codec.compress(cm_old, img, lmbda=0.2, ratios=(0.3, 0.3, 0.4), colour=False)))
  _, idx, gmap = codec.decode_indices(cm_old, data)
  enc = codec.encode_latents(cm_old, img, 0.2, (0.3, 0.3, 0.4))
  masks = layout.sent_masks(np.asarray(gmap), tuple(cfg.model.strides))
  for g in GRANULARITIES:
    np.testing.assert_array_equal(idx[g][masks[g]], np.asarray(enc["indices"][g])[masks[g]])
  # the payload is one stream per branch, each over the branch's sent positions in
  # row-major order, as format 2 always was
  assert [(s.kind, s.branch, s.part) for s in rec.names] == [("map", "", 0)] + [
      (kind, g, 0) for kind in ("z", "y") for g in GRANULARITIES]
  for s, (sym, _) in zip(rec.names, rec.streams):
    if s.kind == "y":
      np.testing.assert_array_equal(sym, np.asarray(enc["indices"][s.branch])[0][masks[s.branch][0]])
  # a version 3 header on this file, and version 2 on a spatial model's file: refused
  with pytest.raises(BitstreamError, match="format version 3"):
    codec.decompress(cm_old, _with_crc(data[:4] + bytes([3]) + data[5:-4]))
  c, m, p, cm = sp_model
  _, rec3 = coder.code_image(cm, img, 0.2, (0.3, 0.3, 0.4), colour=False)
  d3 = _legacy(codec.compress(cm, img, lmbda=0.2, ratios=(0.3, 0.3, 0.4), colour=False), 3, rec3)
  codec.decompress(cm, d3)
  with pytest.raises(BitstreamError, match="format version 2"):
    codec.decompress(cm, _with_crc(d3[:4] + bytes([2]) + d3[5:-4]))
  with pytest.raises(BitstreamError, match="format version 5 .*newer hvq_jax"):
    codec.decompress(cm, _with_crc(d3[:4] + bytes([5]) + d3[5:-4]))


def _legacy(data: bytes, version: int, rec) -> bytes:
  """A format-4 file as format 2 or 3 wrote it: no colour words, the symbols' digest alone."""
  header, payload = bitstream.unpack(data)
  return bitstream.pack(dataclasses.replace(header, version=version, colour=None,
                                            symbols=rec.digest()), payload)


def test_eval_reports_each_pass(sp_model, tmp_path, monkeypatch):
  """`hvq eval`'s per-branch table has each pass's bits per index, which average (weighted
  by the passes' sizes) to the branch's index bits."""
  from hvq_jax.evaluation import evaluate
  c, m, params, cm = sp_model
  monkeypatch.setenv("HVQ_LPIPS_DIR", str(tmp_path / "no_weights"))
  settings = evaluate.parse_settings("0.2", "0.1,0.4,0.5", cm)
  ims = {"coffee": images.bundled_photo("coffee")[:64, :96]}
  s = evaluate.run(cm, ims, settings, str(tmp_path / "out"), ims, (), save_recon=False,
                   progress=False, dists=False, fid_kid=False)
  n = layout.num_passes(c.model)
  data, st = profile.compress(cm, ims["coffee"], lmbda=0.2, ratios=(0.1, 0.4, 0.5))
  for g, d in s["per_branch_bits_per_index"].items():
    ps = st["pass_bits"][g]
    assert len(d["passes_y"]) == n
    np.testing.assert_allclose(d["passes_y"], [b / max(k, 1) for b, k in ps], rtol=1e-9)
    sizes = np.array([k for _, k in ps], float)
    np.testing.assert_allclose((np.array(d["passes_y"]) * sizes).sum() / sizes.sum(),
                               d["hyperprior_y"], rtol=1e-9)
