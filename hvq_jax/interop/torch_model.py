"""The same HVQ-CGIC generator in pure PyTorch, loaded from `hvq export --format torch`.

    from hvq_jax.interop.torch_model import from_safetensors, decompress
    net = from_safetensors("model.safetensors")          # nn.Module, eval mode
    out = net(x)          # x: [B, 3, H, W] float in [-1, 1] (any H, W)
    out["recon"], out["indices"], out["bits"], out["bpp"]   # indices keyed by branch (layout.branches)
    image = decompress(net, open("photo.hvq", "rb").read())   # uint8 [H, W, 3]

`decompress` decodes files made by the JAX codec: the entropy decoding is the codec's own
framework-free code (entropy/streams.py with the integer tables stored in the export), so
the symbols are bit-identical; the pixels come from this module's synthesis network.

Every module mirrors the flax module of the same name (state_dict keys = export keys; the
layers are in `torch_layers.py`),
including the numerics that matter for parity: GroupNorm eps 1e-6, tanh-GELU in the
hyperprior, flax 'SAME' padding (asymmetric when the stride is 2), VQGAN's pad-then-VALID
downsampling, PyTorch-style nearest resizing, and `lax.conv_transpose` (the hyper-
synthesis upsamplers are stored as forward-conv kernels applied to the zero-dilated
input, which is what flax's ConvTranspose computes). Needs the `torch` extra.
"""
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hvq_jax import layout
from hvq_jax.layout import GRANULARITIES
from hvq_jax.interop.torch_layers import (AttnBlock, Conv, ConvTransposeSame, Downsample, GroupNorm,
                                          LambdaFiLM, ResBlock, SpatialNorm, Upsample,
                                          nearest_resize)


# ---- encoder / decoder ------------------------------------------------------------------
class Head(nn.Module):
  def __init__(self, ch, embed_dim, groups, attention, film, chunk):
    super().__init__()
    self.res1 = ResBlock(ch, ch, groups)
    self.attn = AttnBlock(ch, groups, chunk=chunk) if attention else None
    self.res2 = ResBlock(ch, ch, groups)
    self.norm_out = GroupNorm(groups, ch)
    self.film = LambdaFiLM(ch) if film else None
    self.conv_out = Conv(ch, embed_dim, 3)

  def forward(self, h, log_lmbda):
    h = self.res1(h)
    if self.attn is not None:
      h = self.attn(h)
    h = F.silu(self.norm_out(self.res2(h)))
    if self.film is not None:
      h = self.film(h, log_lmbda)
    return self.conv_out(h)


class Encoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.levels = len(c.ch_mult)
    self.nres = c.num_res_blocks
    self.attn_strides = tuple(c.attn_strides)
    self.strides = tuple(c.strides)
    self.conv_in = Conv(3, c.ch, 3)
    ch = c.ch
    widths = {}
    for level, mult in enumerate(c.ch_mult):
      for i in range(c.num_res_blocks):
        setattr(self, f"down{level}_res{i}", ResBlock(ch, c.ch * mult, c.norm_groups))
        ch = c.ch * mult
        if 2 ** level in self.attn_strides:
          setattr(self, f"down{level}_attn{i}", AttnBlock(ch, c.norm_groups, chunk=c.attn_chunk))
      widths[2 ** level] = ch
      if level != self.levels - 1:
        setattr(self, f"down{level}_downsample", Downsample(ch))
    for g, s in zip(GRANULARITIES, self.strides):
      setattr(self, f"head_{g}", Head(widths[s], c.embed_dim, c.norm_groups,
                                      s in tuple(c.head_attn_strides), c.lambda_conditioning,
                                      c.attn_chunk))

  def forward(self, x, log_lmbda):
    h = self.conv_in(x)
    feats = {}
    for level in range(self.levels):
      for i in range(self.nres):
        h = getattr(self, f"down{level}_res{i}")(h)
        if 2 ** level in self.attn_strides:
          h = getattr(self, f"down{level}_attn{i}")(h)
      feats[2 ** level] = h
      if level != self.levels - 1:
        h = getattr(self, f"down{level}_downsample")(h)
    return {g: getattr(self, f"head_{g}")(feats[s], log_lmbda)
            for g, s in zip(GRANULARITIES, self.strides)}


class Decoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.levels = len(c.dec_ch_mult)
    self.nres = c.dec_num_res_blocks
    self.attn_strides = tuple(c.dec_attn_strides)
    g, cc = c.norm_groups, c.embed_dim + 3
    ch = c.dec_ch * c.dec_ch_mult[-1]
    self.conv_in = Conv(cc, ch, 3)
    self.mid_res1 = ResBlock(ch, ch, g, cc)
    self.mid_attn = AttnBlock(ch, g, cc, c.attn_chunk) if c.dec_mid_attn else None
    self.mid_res2 = ResBlock(ch, ch, g, cc)
    for level in reversed(range(self.levels)):
      for i in range(self.nres + 1):
        setattr(self, f"up{level}_res{i}", ResBlock(ch, c.dec_ch * c.dec_ch_mult[level], g, cc))
        ch = c.dec_ch * c.dec_ch_mult[level]
        if 2 ** level in self.attn_strides:
          setattr(self, f"up{level}_attn{i}", AttnBlock(ch, g, cc, c.attn_chunk))
      if level != 0:
        setattr(self, f"up{level}_upsample", Upsample(ch))
    self.norm_out = SpatialNorm(g, ch, cc)
    self.conv_out = Conv(ch, 3, 3)

  def forward(self, cond, out_hw):
    top = 2 ** (self.levels - 1)
    h = self.conv_in(nearest_resize(cond, (out_hw[0] // top, out_hw[1] // top)))
    h = self.mid_res1(h, cond)
    if self.mid_attn is not None:
      h = self.mid_attn(h, cond)
    h = self.mid_res2(h, cond)
    for level in reversed(range(self.levels)):
      for i in range(self.nres + 1):
        h = getattr(self, f"up{level}_res{i}")(h, cond)
        if 2 ** level in self.attn_strides:
          h = getattr(self, f"up{level}_attn{i}")(h, cond)
      if level != 0:
        h = getattr(self, f"up{level}_upsample")(h)
    return self.conv_out(F.silu(self.norm_out(h, cond)))


# ---- codebook, hyperprior, rate -------------------------------------------------------------
class Codebook(nn.Module):
  def __init__(self, k, d, l2):
    super().__init__()
    self.embedding = nn.Parameter(torch.zeros(k, d))
    self.l2 = l2

  def entries(self):
    e = self.embedding
    return e / torch.sqrt((e * e).sum(-1, keepdim=True) + 1e-6) if self.l2 else e

  def normalize(self, y):
    """y [B, D, h, w] as this codebook compares it (unit vectors when l2-normalised)."""
    return y / torch.sqrt((y * y).sum(1, keepdim=True) + 1e-6) if self.l2 else y

  def forward(self, y):
    """y [B, D, h, w] -> indices [B, h, w] (nearest entry, same formula as JAX)."""
    e = self.entries()
    y = self.normalize(y).permute(0, 2, 3, 1)
    d = (y * y).sum(-1, keepdim=True) - 2 * y @ e.T + (e * e).sum(-1)
    return d.argmin(-1)


class EntropyBottleneck(nn.Module):
  def __init__(self, channels, filters=(3, 3, 3)):
    super().__init__()
    dims = (1,) + tuple(filters) + (1,)
    self.n = len(filters)
    for i in range(self.n + 1):
      self.register_parameter(f"matrix{i}", nn.Parameter(torch.zeros(channels, dims[i + 1], dims[i])))
      self.register_parameter(f"bias{i}", nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
      if i < self.n:
        self.register_parameter(f"factor{i}", nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

  def _logits(self, x):
    h = x
    for i in range(self.n + 1):
      h = F.softplus(getattr(self, f"matrix{i}")) @ h + getattr(self, f"bias{i}")
      if i < self.n:
        h = h + torch.tanh(getattr(self, f"factor{i}")) * torch.tanh(h)
    return h

  def likelihood(self, z):
    """z [B, C, h, w] on the integer grid -> P(z) same shape."""
    b, c, hh, ww = z.shape
    v = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
    lo, up = self._logits(v - 0.5), self._logits(v + 0.5)
    sign = torch.where(lo + up > 0, -1.0, 1.0)
    lik = torch.abs(torch.sigmoid(sign * up) - torch.sigmoid(sign * lo)).clamp_min(1e-9)
    return lik.reshape(c, b, hh, ww).permute(1, 0, 2, 3)


class HyperBranch(nn.Module):
  def __init__(self, c):
    super().__init__()
    h = c.hyperprior
    self.num_down = h.num_down
    self.analysis_in = Conv(c.embed_dim, h.channels, 3)
    for i in range(h.num_down):
      out = h.channels if i < h.num_down - 1 else h.latent_channels
      setattr(self, f"analysis_down{i}", Conv(h.channels, out, 5, stride=2))
    ctx = 3 * (c.embed_dim + 1) if h.context == "coarser" else 0
    for i in range(h.num_down):
      cin = h.latent_channels + ctx if i == 0 else h.channels
      setattr(self, f"synthesis_up{i}", ConvTransposeSame(cin, h.channels, 5))
    self.synthesis_out = Conv(h.channels, 2 * c.embed_dim, 3)
    if ctx:
      self.context_in = Conv(ctx, h.channels, 3)
      self.context_full = Conv(h.channels, h.channels, 3)
    self.with_context = bool(ctx)
    self.with_spatial = layout.num_passes(c) > 1
    if self.with_spatial:
      self.spatial_context_in = Conv(c.embed_dim + 1, h.channels, 3)
      self.spatial_context_full = Conv(h.channels, h.channels, 3)
    self.bottleneck = EntropyBottleneck(h.latent_channels)
    self.log_sigma_range = (math.log(h.sigma_min), math.log(h.sigma_max))
    if h.index_bias:
      self.index_bias = nn.Parameter(torch.zeros(c.codebook_size))
      self.bias_scale = float(h.index_bias_scale)
    else:
      self.index_bias = None
    self.mix_logit = nn.Parameter(torch.zeros(())) if h.index_mixture else None

  def analysis(self, y):
    h = F.gelu(self.analysis_in(y), approximate="tanh")
    for i in range(self.num_down):
      h = getattr(self, f"analysis_down{i}")(h)
      if i < self.num_down - 1:
        h = F.gelu(h, approximate="tanh")
    return h

  def synthesis(self, z_hat, grid_hw, ctx=None, spatial=None):
    """z_hat [B, C, h_z, w_z] (and ctx [B, C_ctx, h, w] with hyperprior.context; with
    hyperprior.spatial (the pass of each position [h, w], the earlier passes' entries
    [P - 1, B, D + 1, h, w])) -> (mu, sigma) [B, D, h, w] (the JAX HyperBranch.synthesis)."""
    h = z_hat
    if self.with_context:
      f = 2 ** self.num_down
      hz, wz = z_hat.shape[2:]
      c = F.pad(ctx, (0, wz * f - ctx.shape[3], 0, hz * f - ctx.shape[2]))
      h = torch.cat([h, F.avg_pool2d(c, f)], 1)
    for i in range(self.num_down):
      h = F.gelu(getattr(self, f"synthesis_up{i}")(h), approximate="tanh")
    if self.with_context or self.with_spatial:   # the contexts live on y's grid: crop first
      h = h[:, :, :grid_hw[0], :grid_hw[1]]
    if self.with_context:
      h = h + self.context_full(F.gelu(self.context_in(ctx), approximate="tanh"))
    mu, sigma = self._head(h, grid_hw)
    if spatial is not None:
      passes, maps = spatial
      for p in range(1, maps.shape[0] + 1):
        sp = self.spatial_context_full(F.gelu(self.spatial_context_in(maps[p - 1]),
                                              approximate="tanh"))
        mu_p, sigma_p = self._head(h + sp, grid_hw)
        here = torch.from_numpy(np.asarray(passes == p))[None, None]
        mu, sigma = torch.where(here, mu_p, mu), torch.where(here, sigma_p, sigma)
    return mu, sigma

  def _head(self, h, grid_hw):
    out = self.synthesis_out(h)[:, :, :grid_hw[0], :grid_hw[1]]
    mu, log_sigma = out.chunk(2, dim=1)
    return mu, torch.exp(log_sigma.clamp(*self.log_sigma_range))

  def log_prior(self):
    return None if self.index_bias is None else self.bias_scale * self.index_bias


class StaticIndexPrior(nn.Module):
  """The hyperprior-off ablation: one learned histogram of indices per branch."""
  def __init__(self, c):
    super().__init__()
    self.index_bias = nn.Parameter(torch.zeros(c.codebook_size))
    self.bias_scale = float(c.hyperprior.index_bias_scale)

  def log_prior(self):
    return self.bias_scale * self.index_bias


def index_log_probs(mu, sigma, codebook, log_prior=None, mix_logit=None):
  """mu, sigma [..., D], codebook [K, D] -> log p [..., K] (the JAX rate.py formula)."""
  diff = (codebook - mu[..., None, :]) / sigma[..., None, :]
  logits = -0.5 * (diff * diff).sum(-1)
  if log_prior is not None:
    logits = logits + log_prior
  lp = logits - torch.logsumexp(logits, -1, keepdim=True)
  if mix_logit is not None:
    b = log_prior if log_prior is not None else torch.zeros(codebook.shape[0])
    lp = torch.logaddexp(F.logsigmoid(-mix_logit) + lp,
                         F.logsigmoid(mix_logit) + b - torch.logsumexp(b, 0))
  return lp


# ---- granularity map --------------------------------------------------------------------
def patch_entropy(x, patch, bins=32):
  """x [B, 3, H, W] in [-1, 1] -> entropy of each patch's soft gray histogram [B, H/p, W/p]."""
  b, _, h, w = x.shape
  rgb = (x + 1.0) / 2.0
  gray = torch.einsum("bchw,c->bhw", rgb, torch.tensor([0.299, 0.587, 0.114]))
  centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
  k = torch.exp(-0.5 * ((gray[..., None] - centres) * bins) ** 2)
  k = k / k.sum(-1, keepdim=True)
  hist = k.reshape(b, h // patch, patch, w // patch, patch, bins).mean((2, 4))
  return -(hist * torch.log(hist.clamp_min(1e-12))).sum(-1)


def class_counts(n, ratios):
  r = torch.tensor(ratios, dtype=torch.float32)
  n_f = torch.round(r[2] * n)
  n_fm = torch.clamp(torch.round((r[2] + r[1]) * n), min=float(n_f), max=float(n))
  return torch.stack([n - n_fm, n_fm - n_f, n_f]).long()


def granularity_map(x, ratios, patch, bins=32):
  scores = patch_entropy(x, patch, bins)
  b, h, w = scores.shape
  counts = class_counts(h * w, ratios)
  order = torch.argsort(-scores.reshape(b, -1), dim=-1, stable=True)
  rank = torch.argsort(order, dim=-1, stable=True)
  gmap = torch.where(rank < counts[2], 2, torch.where(rank < counts[2] + counts[1], 1, 0))
  return gmap.reshape(b, h, w)


# ---- the model -------------------------------------------------------------------------------
class HVQ(nn.Module):
  def __init__(self, model_cfg, lmbda: float = 1.0, ratios: Sequence[float] = (0.1, 0.4, 0.5)):
    super().__init__()
    c = model_cfg
    self.cfg = c
    self.default_lmbda, self.default_ratios = float(lmbda), tuple(float(r) for r in ratios)
    self.encoder = Encoder(c)
    self.decoder = Decoder(c)
    self.stages = int(c.rvq_stages)
    self.hyper_on = bool(c.hyperprior.enabled)
    # Same branch keys and module names as hvq_jax.nn.model (stage 0: the granularity's
    # name; residual stage s: f"{g}_s{s}", never l2-normalised).
    self.branches = list(layout.branches(c))
    self.codebook_names = {k: layout.codebook_name(c, k, st) for k, _, st in self.branches}
    for k, g, st in self.branches:
      if not hasattr(self, self.codebook_names[k]):
        setattr(self, self.codebook_names[k],
                Codebook(c.codebook_size, c.embed_dim, c.l2_normalized and st == 0))
      if self.hyper_on:
        setattr(self, f"hyper_{k}", HyperBranch(c))
      else:
        setattr(self, f"static_{k}", StaticIndexPrior(c))

  def codebooks(self, k):
    return getattr(self, self.codebook_names[k])

  @torch.no_grad()
  def forward(self, x, lmbda: Optional[float] = None, ratios: Optional[Sequence[float]] = None):
    """x [B, 3, H, W] in [-1, 1] -> recon (same layout/range), indices, map, bits, bpp."""
    c = self.cfg
    lmbda = self.default_lmbda if lmbda is None else float(lmbda)
    ratios = self.default_ratios if ratios is None else tuple(float(r) for r in ratios)
    b, _, H, W = x.shape
    s = tuple(c.strides)
    xp = F.pad(x, (0, (-W) % s[0], 0, (-H) % s[0]), mode="replicate")
    log_l = torch.full((b,), math.log(lmbda))
    y = self.encoder(xp, log_l)
    gmap = granularity_map(xp, ratios, s[0], c.granularity_bins)
    bits, indices, masks, q = {}, {}, {}, {}
    z_bits = torch.zeros(b)
    sent = layout.sent_masks(gmap.numpy(), s)
    zmask = layout.z_masks(sent, c.hyperprior.num_down)
    for g in GRANULARITIES:
      m = torch.from_numpy(np.array(sent[g]))
      any_sent = (m.flatten(1).sum(1) > 0).float()
      v = y[g]                                   # [B, D, h, w]: what the next stage quantises
      q[g], bits[f"y_{g}"], masks[g] = 0.0, torch.zeros(b), m
      for k, gk, _ in self.branches:
        if gk != g:
          continue
        cb = self.codebooks(k)
        idx = cb(v)
        e = cb.entries()
        if self.hyper_on:
          hb = getattr(self, f"hyper_{k}")
          z_hat = torch.round(hb.analysis(v))
          if c.hyperprior.mask_z:
            zm = torch.from_numpy(np.array(zmask[g]))
            z_hat = z_hat * zm[:, None].float()
          else:
            zm = torch.ones(z_hat.shape[0], *z_hat.shape[2:], dtype=torch.bool)
          zb = -torch.log2(hb.bottleneck.likelihood(z_hat)) * zm[:, None].float()
          z_bits = z_bits + zb.flatten(1).sum(1) * any_sent
          ctx = self.prior_context(g, q, masks) if hb.with_context else None
          sp = self.spatial_context(e[idx], m) if hb.with_spatial else None
          mu, sigma = hb.synthesis(z_hat, idx.shape[1:], ctx, sp)
          lp = index_log_probs(mu.permute(0, 2, 3, 1), sigma.permute(0, 2, 3, 1), e,
                               hb.log_prior(), hb.mix_logit)
        else:
          lp = torch.log_softmax(getattr(self, f"static_{k}").log_prior(), 0).expand(
              *idx.shape, -1)
        per = -torch.gather(lp, -1, idx[..., None])[..., 0] / math.log(2.0)
        bits[f"y_{g}"] = bits[f"y_{g}"] + (per * m.float()).flatten(1).sum(1)
        indices[k] = idx
        q[g] = q[g] + e[idx]
        vin = cb.normalize(v)                   # the residual left for the next stage
        v = vin - e[idx].permute(0, 3, 1, 2)
      q[g] = q[g] * m[..., None].float()
    bits["z"] = z_bits
    counts = class_counts(gmap[0].numel(), ratios).float()
    p = counts[gmap.reshape(b, -1)] / gmap[0].numel()
    bits["map"] = -torch.log2(p.clamp_min(1e-12)).sum(-1)
    recon = self.synthesize(q, gmap, xp.shape[2:])[:, :, :H, :W]
    total = sum(bits.values())
    return dict(recon=recon, indices=indices, masks=masks, gmap=gmap, bits=bits,
                bpp=total / (H * W))

  def prior_context(self, g, q, masks):
    """The JAX HVQ.prior_context (`layout.prior_context`, in numpy): q {g: [B, h, w, D]}
    of the coarser granularities, masks {g: bool [B, h, w]} -> [B, 3 (D + 1), h_g, w_g]."""
    coarser = GRANULARITIES[:GRANULARITIES.index(g)]
    ctx = layout.prior_context(g, {o: np.asarray(m) for o, m in masks.items()},
                               {o: q[o].numpy() for o in coarser}, tuple(self.cfg.strides),
                               self.cfg.embed_dim, np.float32(1.0))
    return torch.from_numpy(np.ascontiguousarray(ctx)).permute(0, 3, 1, 2)

  def spatial_context(self, entries, mask):
    """The JAX HVQ.spatial_context (`layout.spatial_context`, in numpy): entries
    [B, h, w, D] of this granularity's indices, mask bool [B, h, w] -> (pass of each
    position [h, w], [P - 1, B, D + 1, h, w])."""
    n = layout.num_passes(self.cfg)
    passes = layout.pass_map(mask.shape[1], mask.shape[2], n)
    e, m = entries.numpy(), np.asarray(mask)
    maps = np.stack([layout.spatial_context(e, m, passes, p, np.float32(1.0))
                     for p in range(1, n)])
    return passes, torch.from_numpy(np.ascontiguousarray(maps)).permute(0, 1, 4, 2, 3)

  def synthesize(self, q, gmap, out_hw):
    """Quantised embeddings {g: [B, h_g, w_g, D]} (zero where not sent) + map [B, hc, wc]
    -> image [B, 3, H, W] in [-1, 1] at the padded size (the JAX `HVQ.synthesize`)."""
    s = tuple(self.cfg.strides)
    s_f = s[-1]
    merged = sum(q[g].repeat_interleave(st // s_f, 1).repeat_interleave(st // s_f, 2)
                 for g, st in zip(GRANULARITIES, s))
    f = s[0] // s_f
    onehot = F.one_hot(gmap.repeat_interleave(f, 1).repeat_interleave(f, 2), 3).float()
    cond = torch.cat([merged, onehot], -1).permute(0, 3, 1, 2)
    return self.decoder(cond, out_hw)

  @torch.no_grad()
  def decode_latents(self, indices, gmap, out_hw):
    """Decoded indices {branch: int [B, h_g, w_g]} + map -> image [B, 3, H, W] (padded)."""
    masks = layout.sent_masks(gmap.numpy(), tuple(self.cfg.strides))
    q = {}
    for k, g, _ in self.branches:
      e = self.codebooks(k).entries()[indices[k].long()]
      q[g] = q.get(g, 0.0) + e
    q = {g: v * torch.from_numpy(np.array(masks[g]))[..., None].float() for g, v in q.items()}
    return self.synthesize(q, gmap.long(), out_hw)


def from_safetensors(path: str) -> HVQ:
  """Load `hvq export --format torch` output: config from the metadata, weights strict."""
  from hvq_jax.interop import export
  tensors, model_cfg, rd = export.load_torch(path)
  net = HVQ(model_cfg, rd["lmbda"], rd["ratios"])
  state = {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
  missing, unexpected = net.load_state_dict(state, strict=False)
  if missing or unexpected:
    raise export.ExportError(f"{path}: missing keys {missing[:10]}, unexpected keys "
                             f"{unexpected[:10]}")
  net.coding_path = path
  return net.eval()


def decompress(net: HVQ, data: bytes) -> np.ndarray:
  """.hvq bytes made by the JAX codec -> uint8 [H, W, 3], decoded with PyTorch.

  Raises `BitstreamError` for anything not decodable (as `hvq_jax.codec.decompress`) and
  `ExportError` when the export carries no coding tables."""
  from hvq_jax.entropy import streams
  from hvq_jax.interop import export
  if getattr(net, "coding", None) is None:
    net.coding = export.load_coding(net.coding_path)
  tables, fingerprint, codec = net.coding
  header, payload, hw = streams.read_header(data, fingerprint, net.cfg,
                                            codec["max_pixels"])
  gmap, indices = streams.decode(tables, net.cfg, int(codec["z_range"]), header, payload, hw)
  x = net.decode_latents({k: torch.from_numpy(v) for k, v in indices.items()},
                         torch.from_numpy(gmap), hw)
  img = torch.clamp(torch.round((x + 1.0) * 127.5), 0, 255).to(torch.uint8)
  img = img[0].permute(1, 2, 0)[:header.height, :header.width].numpy()
  if header.colour is None:
    return img
  from hvq_jax import colour    # integers on the host: the JAX decoder's very code
  return colour.apply(img, header.colour)
