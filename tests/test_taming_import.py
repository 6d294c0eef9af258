"""Tokenizers someone else trained: taming-transformers' VQGAN and Control-GIC imported
into our model, checked against the reference code itself (taming-transformers from
PyPI with random weights: its Encoder, VectorQuantizer2 and Decoder give the indices and
pixels we must reproduce); Lightning-era checkpoints read without running their code;
the plug-in prior's whole path on an imported tokenizer, one command each."""
import collections
import os
import sys
import types

import numpy as np
import jax
import jax.numpy as jnp
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops", reason="taming's quantizer needs einops (the test extra)")
tm = pytest.importorskip(
    "taming.modules.diffusionmodules.model",
    reason="the reference code: pip install --no-deps taming-transformers-rom1504==0.0.6 einops")
from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: E402

from hvq_jax import images  # noqa: E402
from hvq_jax.configs import control_gic, taming_f16_1024, taming_f16_16384  # noqa: E402
from hvq_jax.interop import export, import_weights, torch_checkpoint  # noqa: E402
from hvq_jax.nn import model as model_lib  # noqa: E402
from tests.conftest import hvq_cli  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")


# ---- taming's VQModel with random weights ---------------------------------------------------
def taming_vqgan(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 embed_dim, n_embed, seed=0):
  """taming's VQModel parts (the modules it builds, under its state-dict names) with
  random weights; GroupNorm affines random too, so a mapping that dropped them fails."""
  torch.manual_seed(seed)
  dd = dict(double_z=False, z_channels=z_channels, resolution=resolution, in_channels=3,
            out_ch=3, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
            attn_resolutions=list(attn_resolutions), dropout=0.0)
  m = torch.nn.ModuleDict(dict(
      encoder=tm.Encoder(**dd), decoder=tm.Decoder(**dd),
      quantize=VectorQuantizer2(n_embed, embed_dim, beta=0.25),
      quant_conv=torch.nn.Conv2d(z_channels, embed_dim, 1),
      post_quant_conv=torch.nn.Conv2d(embed_dim, z_channels, 1))).eval()
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, torch.nn.GroupNorm):
        mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
        mod.bias.copy_(0.2 * torch.randn_like(mod.bias))
  return m


def state_dict(m):
  return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def taming_reference(m, img):
  """taming's own encode -> indices [h, w] and decode(indices) -> [H, W, 3]."""
  x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
  with torch.no_grad():
    zq, _, (_, _, idx) = m["quantize"](m["quant_conv"](m["encoder"](x)))
    rec = m["decoder"](m["post_quant_conv"](zq))
  return idx.reshape(zq.shape[2], zq.shape[3]).numpy(), rec[0].permute(1, 2, 0).numpy()


def zero_params(model_cfg):
  """Our params' shapes filled with zeros (no init program to compile)."""
  mdl = model_lib.build(model_cfg)
  shapes = jax.eval_shape(lambda: model_lib.init_params(mdl, jax.random.PRNGKey(0), 32))
  return mdl, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)


def narrow_f16_config(ch=32, num_res_blocks=1, embed_dim=32, codebook_size=1024):
  c = taming_f16_1024.get_config()
  c.model.update(ch=ch, dec_ch=ch, num_res_blocks=num_res_blocks,
                 dec_num_res_blocks=num_res_blocks, embed_dim=embed_dim,
                 codebook_size=codebook_size)
  c.model.hyperprior.channels = 16
  return c


def ours_on(mdl, params, img, indices_from_taming):
  """Our encode_latents (indices, map) and decode_latents of taming's indices."""
  h, w = img.shape[:2]
  x = jnp.asarray(img.astype(np.float32)[None] / 127.5 - 1.0)
  lat = jax.jit(lambda p, x: mdl.apply({"params": p}, x, jnp.ones((1,)), jnp.array([1.0, 0.0, 0.0]),
                                       method=model_lib.HVQ.encode_latents))(params, x)
  idx = {g: jnp.zeros((1, h // s, w // s), jnp.int32)
         for g, s in zip(("coarse", "medium", "fine"), mdl.cfg.strides)}
  idx["coarse"] = jnp.asarray(indices_from_taming)[None]
  rec = jax.jit(lambda p, i, gm: mdl.apply({"params": p}, i, gm, (h, w),
                                          method=model_lib.HVQ.decode_latents))(params, idx, lat["gmap"])
  return np.asarray(lat["indices"]["coarse"][0]), np.asarray(lat["gmap"][0]), np.asarray(rec[0])


PHOTOS = [("coffee", (slice(0, 128), slice(0, 192))), ("astronaut", (slice(64, 192), slice(128, 256)))]


def _modules(keys):
  """'encoder.head_fine.res1.conv1.weight' -> 'encoder.head_fine'; 'hyper_x.a.b' -> 'hyper_x'."""
  return {".".join(k.split(".")[:2 if k.startswith(("encoder.", "decoder.")) else 1]) for k in keys}


def _check_reproduces(m, cfg, photos):
  sd = state_dict(m)
  import_weights.check_config(cfg, sd, "taming")
  mdl, params = zero_params(cfg.model)
  params, report = import_weights.import_tokenizer(params, sd, "taming", cfg.model)
  # what stays at init: the prior and the unused heads, nothing of the tokenizer
  assert _modules(report["kept_init"]) == {"encoder.head_medium", "encoder.head_fine",
                                           "hyper_coarse", "hyper_medium", "hyper_fine"}
  errs = []
  for name, crop in photos:
    img = images.bundled_photo(name)[crop]
    ref_idx, ref_rec = taming_reference(m, img)
    idx, gmap, rec = ours_on(mdl, params, img, ref_idx)
    assert (gmap == 0).all()                              # everything sent coarse
    np.testing.assert_array_equal(idx, ref_idx, err_msg=name)   # 100% of taming's indices
    err = np.abs(rec - ref_rec).max()
    assert err <= 1e-4 * max(1.0, np.abs(ref_rec).max()), (name, err)
    errs.append(err)
  return errs


def test_taming_f16_import_reproduces_taming():
  """taming's f16 structure (5 levels, ch_mult 1,1,2,2,4, attention at 16) at reduced
  width, z_channels != D so the quant_conv fold is general: same indices, same pixels."""
  m = taming_vqgan(32, (1, 1, 2, 2, 4), 1, (16,), 256, 48, 32, 1024)
  _check_reproduces(m, narrow_f16_config(), PHOTOS)


@pytest.mark.slow
@pytest.mark.parametrize("cfg_mod,k", [(taming_f16_1024, 1024), (taming_f16_16384, 16384)])
def test_taming_f16_full_size(cfg_mod, k):
  """The released f16 models' exact shapes (ch 128, 2 ResBlocks, D 256) and configs."""
  m = taming_vqgan(128, (1, 1, 2, 2, 4), 2, (16,), 256, 256, 256, k)
  cfg = cfg_mod.get_config()
  cfg.model.hyperprior.channels = 16
  _check_reproduces(m, cfg, PHOTOS[:1])


def test_config_that_does_not_fit_names_fields_and_the_config_that_does():
  with torch.device("meta"):   # shapes only: the real f16 K=16384 key set, no memory
    m = taming_vqgan(128, (1, 1, 2, 2, 4), 2, (16,), 256, 256, 256, 16384)
  sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in m.state_dict().items()}
  assert import_weights.detect(sd) == "taming"
  assert import_weights.fitting_config(import_weights.architecture(sd, "taming"), "taming") \
      == "taming_f16_16384"
  with pytest.raises(export.ExportError) as e:
    import_weights.check_config(taming_f16_1024.get_config(), sd, "taming", "configs/taming_f16_1024.py")
  msg = str(e.value)
  assert "model.codebook_size: config 1024, checkpoint 16384" in msg
  assert "configs/taming_f16_16384.py fits" in msg
  c = taming_f16_16384.get_config()
  c.granularity.ratios = (0.1, 0.4, 0.5)
  with pytest.raises(export.ExportError, match="granularity.ratios"):
    import_weights.check_config(c, sd, "taming")
  # a model of another shape (the config check bypassed): the mapping names the keys
  cfg = taming_f16_16384.get_config()
  cfg.model.num_res_blocks = 1
  mapped, info = import_weights.source_tensors(sd, "taming", 256)
  ours = import_weights.torch_shapes(jax.eval_shape(lambda: model_lib.init_params(
      model_lib.build(cfg.model), jax.random.PRNGKey(0), 32)))
  with pytest.raises(export.ExportError, match=r"no place for.*encoder\.down0_res1"):
    import_weights.plan(ours, sd, "taming", mapped, info)


def test_torch_shapes_are_the_exports(micro):
  _, _, params = micro
  assert import_weights.torch_shapes(params) == {k: v.shape for k, v in export.flax_to_torch(params).items()}


# ---- Lightning-era checkpoints ------------------------------------------------------------
def _fake_class(modname, clsname, base=object, **attrs):
  """A class that pickles under modname.clsname (its module exists only while saving)."""
  parts = modname.split(".")
  for i in range(1, len(parts) + 1):
    sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
  cls = type(clsname, (base,), dict(attrs, __module__=modname))
  setattr(sys.modules[modname], clsname, cls)
  return cls


def lightning_checkpoint(sd, path, sentinel):
  """What pytorch-lightning 1.x's `ModelCheckpoint` writes (taming's and Control-GIC's
  era): callback states keyed by the callback's class, optimizer states, OmegaConf and
  AttributeDict hyper-parameters; plus an object whose unpickling would run a command."""
  before = set(sys.modules)
  mc = _fake_class("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
  attr_dict = _fake_class("pytorch_lightning.utilities.parsing", "AttributeDict", dict)
  dict_config = _fake_class("omegaconf.dictconfig", "DictConfig")

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {sentinel}",))

  dc = dict_config()
  dc.__dict__.update(_content={"embed_dim": 256}, _metadata=None)
  ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
          "state_dict": collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items()),
          "callbacks": {mc: {"best_model_score": torch.tensor(0.25), "dirpath": "logs/"}},
          "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                                "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
          "lr_schedulers": [], "hparams_name": "kwargs",
          "hyper_parameters": attr_dict(ddconfig=dc, n_embed=1024), "payload": Payload()}
  torch.save(ckpt, path)
  for k in set(sys.modules) - before:
    del sys.modules[k]


def test_lightning_checkpoint_loads_without_running_code(tmp_path):
  m = taming_vqgan(32, (1, 1, 2), 1, (8,), 32, 8, 8, 64)
  sd = state_dict(m)
  sentinel = tmp_path / "code_ran"
  path = str(tmp_path / "last.ckpt")
  lightning_checkpoint(sd, path, sentinel)
  with pytest.raises(Exception, match="Unsupported global"):   # why torch's own is not enough
    torch.load(path, weights_only=True)
  before = set(sys.modules)
  tensors, info = torch_checkpoint.state_dict(path)
  assert not sentinel.exists()
  assert not {k for k in set(sys.modules) - before
              if k.split(".")[0] in ("pytorch_lightning", "omegaconf", "posix", "os")}
  assert sorted(tensors) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(tensors[k], sd[k], err_msg=k)
  assert info["lightning"] and "posix.system" in info["inert"]
  assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in info["inert"]
  # the old non-zip format goes through the same unpickler
  legacy = str(tmp_path / "legacy.pt")
  torch.save({"state_dict": {"w": torch.ones(2)}, "payload": (os.system, "x")}, legacy,
             _use_new_zipfile_serialization=False)
  np.testing.assert_array_equal(torch_checkpoint.state_dict(legacy)[0]["w"], np.ones(2))


def test_checkpoint_reader_errors(tmp_path):
  (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
  with pytest.raises(torch_checkpoint.CheckpointError, match="not a readable torch checkpoint"):
    torch_checkpoint.state_dict(str(tmp_path / "junk.ckpt"))
  torch.save({"epoch": 1, "optimizer_states": []}, str(tmp_path / "no_sd.ckpt"))
  with pytest.raises(torch_checkpoint.CheckpointError, match="no state dict of tensors"):
    torch_checkpoint.state_dict(str(tmp_path / "no_sd.ckpt"))
  with pytest.raises(torch_checkpoint.CheckpointError, match="no such file"):
    torch_checkpoint.state_dict(str(tmp_path / "missing.ckpt"))


# ---- Control-GIC ----------------------------------------------------------------------------
def control_gic_keys():
  """{key: shape} of Control-GIC's checkpoint as its inference config implies
  (tests/data/control_gic_state_dict_keys.txt: read from its code, not the real file)."""
  out = {}
  for line in open(os.path.join(DATA, "control_gic_state_dict_keys.txt")):
    if line.startswith("#") or not line.strip():
      continue
    if line.startswith("quantize.embedding_counter."):
      out.update({f"quantize.embedding_counter.{i}": (1,) for i in range(1024)})
      continue
    key, shape = line.split(" ", 1)
    out[key] = tuple(int(v) for v in shape.strip().strip("()").split(",") if v.strip())
  return out


def test_control_gic_key_names_and_shapes():
  """Its real key names and shapes against configs/control_gic.py: every encoder, head,
  codebook and upsampling-path tensor lands in a parameter of its shape; what cannot
  map is the decoder's three stride-4 stems (and losses/usage counts)."""
  shapes = control_gic_keys()
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  assert import_weights.detect(sd) == "control_gic"
  cfg = control_gic.get_config()
  assert not import_weights.config_mismatches(cfg.model, import_weights.architecture(sd, "control_gic"))
  mapped, info = import_weights.source_tensors(sd, "control_gic", 4)
  ours = import_weights.torch_shapes(jax.eval_shape(lambda: model_lib.init_params(
      model_lib.build(cfg.model), jax.random.PRNGKey(0), 32)))
  report = import_weights.plan(ours, sd, "control_gic", mapped, info)
  assert all(k.startswith("hyper_") for k in report["kept_init"])   # the whole model is filled
  assert {k for k in shapes if k.startswith("encoder.")} <= info["used"]   # all of the encoder
  assert "codebook.embedding" in report["exact"]
  assert _modules(report["no_counterpart"]) == {"decoder.conv_in", "decoder.mid",
                                                "decoder.conv_in_fine", "decoder.mid_fine"}
  assert _modules(report["approximate"]) == {"decoder.conv_in", "decoder.mid_res1",
                                             "decoder.mid_attn", "decoder.mid_res2"}
  exact_up = [k for k in report["exact"] if k.startswith("decoder.up")]
  assert len(exact_up) == len([k for k in shapes if k.startswith("decoder.up.")])


def reduced(shapes, ch):
  """Control-GIC's shapes at width `ch` instead of 128: channel dims scale, D=4, RGB and
  kernel sizes do not."""
  return {k: tuple(d * ch // 128 if i < 2 and d % 128 == 0 else d for i, d in enumerate(s))
          for k, s in shapes.items()}


def control_gic_encoder(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z, seed=0):
  """Control-GIC's encoder from taming's blocks (its ResnetBlock, AttnBlock, Downsample
  and Normalize are taming's code), under Control-GIC's names, random weights."""
  torch.manual_seed(seed)
  enc = torch.nn.Module()
  enc.conv_in = torch.nn.Conv2d(3, ch, 3, padding=1)
  enc.down = torch.nn.ModuleList()
  block_in, res = ch, resolution
  for level, mult in enumerate(ch_mult):
    d = torch.nn.Module()
    d.block, d.attn = torch.nn.ModuleList(), torch.nn.ModuleList()
    for _ in range(num_res_blocks):
      d.block.append(tm.ResnetBlock(in_channels=block_in, out_channels=ch * mult, temb_channels=0, dropout=0.0))
      block_in = ch * mult
      if res in attn_resolutions:
        d.attn.append(tm.AttnBlock(block_in))
    if level != len(ch_mult) - 1:
      d.downsample = tm.Downsample(block_in, True)
      res //= 2
    enc.down.append(d)
  for mid, norm, conv, c in (("mid_fine", "norm_out_fine", "conv_out_fine", block_in // 2),
                             ("mid", "norm_out", "conv_out", block_in),
                             ("mid_coarse", "norm_out_coarse", "conv_out_coarse", block_in)):
    mm = torch.nn.Module()
    mm.block_1 = tm.ResnetBlock(in_channels=c, out_channels=c, temb_channels=0, dropout=0.0)
    mm.attn_1 = tm.AttnBlock(c)
    mm.block_2 = tm.ResnetBlock(in_channels=c, out_channels=c, temb_channels=0, dropout=0.0)
    setattr(enc, mid, mm)
    setattr(enc, norm, tm.Normalize(c))
    setattr(enc, conv, torch.nn.Conv2d(c, z, 3, padding=1))
  with torch.no_grad():
    for mod in enc.modules():
      if isinstance(mod, torch.nn.GroupNorm):
        mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
        mod.bias.copy_(0.2 * torch.randn_like(mod.bias))
  return enc.eval()


def control_gic_features(enc, x):
  """Control-GIC's Encoder.forward up to the router: (h_coarse, h_medium, h_fine)."""
  run = lambda mid, norm, conv, h: getattr(enc, conv)(tm.nonlinearity(getattr(enc, norm)(
      getattr(enc, mid).block_2(getattr(enc, mid).attn_1(getattr(enc, mid).block_1(h, None)), None))))
  hs, n = [enc.conv_in(x)], len(enc.down)
  for level, d in enumerate(enc.down):
    for i, blk in enumerate(d.block):
      h = blk(hs[-1], None)
      if len(d.attn):
        h = d.attn[i](h)
      hs.append(h)
    if level != n - 1:
      hs.append(d.downsample(hs[-1]))
    if level == n - 3:
      h_fine = h
    if level == n - 2:
      h_medium = h
  return (run("mid_coarse", "norm_out_coarse", "conv_out_coarse", hs[-1]),
          run("mid", "norm_out", "conv_out", h_medium), run("mid_fine", "norm_out_fine", "conv_out_fine", h_fine))


def test_control_gic_reference_encoder_has_the_real_keys():
  with torch.device("meta"):
    enc = control_gic_encoder(128, (1, 2, 2, 4, 4), 2, (32,), 256, 4)
  ours = {f"encoder.{k}": tuple(v.shape) for k, v in enc.state_dict().items()}
  assert ours == {k: s for k, s in control_gic_keys().items() if k.startswith("encoder.")}


def test_control_gic_indices_match_at_every_position():
  """Reduced width, Control-GIC's structure: every granularity's indices at every position
  equal Control-GIC's (its heads, quant_conv and L2 argmin over its codebook)."""
  ch, mult, z, k = 32, (1, 2, 2, 4, 4), 4, 1024
  enc = control_gic_encoder(ch, mult, 2, (32,), 256, z)
  torch.manual_seed(1)
  quant = VectorQuantizer2(k, z, beta=0.25)
  with torch.no_grad():   # entries at the features' scale: indices decided by real distances
    quant.embedding.weight.normal_()
  quant_conv, post_quant_conv = torch.nn.Conv2d(z, z, 1), torch.nn.Conv2d(z, z, 1)
  sd = {f"encoder.{kk}": v.numpy() for kk, v in enc.state_dict().items()}
  sd.update({f"quantize.{kk}": v.numpy() for kk, v in quant.state_dict().items()})
  sd.update({f"quant_conv.{kk}": v.numpy() for kk, v in quant_conv.state_dict().items()})
  sd.update({f"post_quant_conv.{kk}": v.numpy() for kk, v in post_quant_conv.state_dict().items()})
  # the decoder at the same reduced width, under the file's key names (values random)
  small = reduced(control_gic_keys(), ch)
  assert {k: v.shape for k, v in sd.items() if k.startswith("encoder.")} == \
      {k: s for k, s in small.items() if k.startswith("encoder.")}
  rng = np.random.default_rng(0)
  sd.update({k: (0.05 * rng.normal(size=s)).astype(np.float32) for k, s in small.items()
             if k.startswith("decoder.")})
  cfg = control_gic.get_config()
  cfg.model.update(ch=ch, dec_ch=ch)
  cfg.model.hyperprior.channels = 16
  import_weights.check_config(cfg, sd, "control_gic")
  mdl, params = zero_params(cfg.model)
  params, report = import_weights.import_tokenizer(params, sd, "control_gic", cfg.model)
  img = images.bundled_photo("astronaut")[96:160, 160:240]
  x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
  with torch.no_grad():
    ref = {g: quant(quant_conv(h))[2][2].reshape(h.shape[2], h.shape[3]).numpy()
           for g, h in zip(("coarse", "medium", "fine"), control_gic_features(enc, x))}
  lat = jax.jit(lambda p, x: mdl.apply({"params": p}, x, jnp.ones((1,)), jnp.array([0.1, 0.4, 0.5]),
                                       method=model_lib.HVQ.encode_latents))(
      params, jnp.asarray(img.astype(np.float32)[None] / 127.5 - 1.0))
  for g in ref:
    np.testing.assert_array_equal(np.asarray(lat["indices"][g][0]), ref[g], err_msg=g)
    assert len(np.unique(ref[g])) > 5, g     # a real test: many entries in use


# ---- the plug-in prior's whole path ---------------------------------------------------------
MICRO_CONFIG = '''
from hvq_jax.configs import taming_f16_1024

def get_config():
  """A 3-level taming-style VQGAN (strides 4/2/1, attention at 4) and a micro prior."""
  c = taming_f16_1024.get_config()
  c.model.update(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_strides=(4,),
                 head_attn_strides=(4,), dec_ch=32, dec_ch_mult=(1, 1, 2),
                 dec_num_res_blocks=1, dec_attn_strides=(4,), strides=(4, 2, 1),
                 embed_dim=8, codebook_size=64, rate_chunk=0)
  c.model.hyperprior.update(channels=16, latent_channels=4, num_down=2)
  c.image_size = 32
  c.train.update(batch_size=2, num_steps=2, log_every=1, ckpt_every=2, warmup_steps=1,
                 async_checkpoint=False)
  c.eval.enabled = False
  return c
'''


@pytest.mark.slow   # about a minute of compiles; the fast suite keeps the parts
def test_plug_in_prior_on_an_imported_taming_tokenizer(tmp_path, monkeypatch):
  """import (a Lightning-era .ckpt) -> hvq train (prior only) -> hvq eval -> hvq compress /
  decompress -> hvq export --format torch, each the command a user runs; the decoded
  pixels are taming's own reconstruction of the photo."""
  from PIL import Image
  # the commands share the tests' compilation cache (a rerun skips the compiles)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
  m = taming_vqgan(32, (1, 1, 2), 1, (8,), 32, 8, 8, 64)
  ckpt = str(tmp_path / "last.ckpt")
  lightning_checkpoint(state_dict(m), ckpt, tmp_path / "code_ran")
  cfg = tmp_path / "micro_taming.py"
  cfg.write_text(MICRO_CONFIG)
  imp, plug = str(tmp_path / "imported"), str(tmp_path / "plug")
  r = hvq_cli("import", "--from", "taming", "--checkpoint", ckpt, "--config", str(cfg), "--out", imp)
  assert r.returncode == 0, r.stderr
  assert "exact:" in r.stdout and "left inert" in r.stdout and not (tmp_path / "code_ran").exists()
  r = hvq_cli("train", "--config", str(cfg), "--workdir", plug, f"--config.train.init_from={imp}",
              "--config.train.trainable=prior", "--noprogress")
  assert r.returncode == 0, r.stderr
  photos = tmp_path / "photos"
  photos.mkdir()
  img = images.bundled_photo("coffee")[:48, :64]
  Image.fromarray(img).save(photos / "coffee.png")
  r = hvq_cli("eval", "--checkpoint", plug, "--out", str(tmp_path / "res"), "--images", str(photos),
              "--fit-images", str(photos), "--baselines", "jpeg", "--no-recon", "--no-progress")
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "res" / "summary.json").exists()
  r = hvq_cli("compress", str(photos / "coffee.png"), "-o", str(tmp_path / "c.hvq"), "--checkpoint", plug)
  assert r.returncode == 0, r.stderr
  r = hvq_cli("decompress", str(tmp_path / "c.hvq"), "-o", str(tmp_path / "c.png"), "--checkpoint", plug)
  assert r.returncode == 0, r.stderr
  out = np.asarray(Image.open(tmp_path / "c.png"))
  ref_idx, ref = taming_reference(m, img)
  ref = np.clip(np.round((ref + 1.0) * 127.5), 0, 255)
  assert out.shape == img.shape and np.abs(out.astype(int) - ref.astype(int)).max() <= 1
  st = str(tmp_path / "m.safetensors")
  r = hvq_cli("export", "--checkpoint", plug, "--format", "torch", "--out", st)
  assert r.returncode == 0, r.stderr
  from hvq_jax.interop import torch_model
  net = torch_model.from_safetensors(st)
  net.coding = export.load_coding(st)
  back = torch_model.decompress(net, (tmp_path / "c.hvq").read_bytes())
  from hvq_jax import colour
  from hvq_jax.entropy import bitstream
  tol = colour.bound(bitstream.unpack((tmp_path / "c.hvq").read_bytes())[0].colour)
  assert np.abs(back.astype(int) - out.astype(int)).max() <= tol
  with torch.no_grad():   # the PyTorch model of the export: taming's indices too
    got = net(torch.from_numpy(img.astype(np.float32)[None] / 127.5 - 1.0).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(got["indices"]["coarse"][0].numpy(), ref_idx)


def test_import_cli_names_the_right_source(tmp_path):
  shapes = control_gic_keys()
  sd = {k: torch.zeros(s) for k, s in shapes.items() if k.startswith(("quantize.embedding.w", "encoder.conv_in", "encoder.down.0.block.0.conv1", "encoder.mid_coarse.block_1.conv1", "decoder.conv_in_coarse"))}
  path = str(tmp_path / "cgic.ckpt")
  torch.save({"state_dict": sd}, path)
  r = hvq_cli("import", "--from", "taming", "--checkpoint", path, "--out", str(tmp_path / "o"))
  assert r.returncode != 0 and "use --from control-gic" in r.stderr and "Traceback" not in r.stderr
