"""HVQ-CGIC: multi-granularity VQGAN whose indices are priced by per-granularity hyperpriors.

Residual VQ (config `model.rvq_stages` = N > 1, an ablation tokenizer): each granularity's
y is quantised by N codebooks in turn, stage s quantising what stages < s left; the
decoder sees the sum of the N entries, and every stage's indices are a separate stream
priced by their own hyperprior branch (or static histogram). A "branch" below is one
(granularity, stage) index stream; stage 0 keeps the plain granularity name, so a
1-stage model has exactly the parameters and streams of the paper's model.
"""
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from hvq_jax import layout
from hvq_jax.layout import GRANULARITIES, branches, codebook_name
from hvq_jax.nn import granularity
from hvq_jax.entropy import rate
from hvq_jax.nn.codebook import Codebook
from hvq_jax.nn.decoder import Decoder
from hvq_jax.nn.encoder import Encoder
from hvq_jax.nn.hyperprior import HyperBranch, StaticIndexPrior


class ConfigError(ValueError):
  """A config value that cannot build a model; the message names the field."""


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Check a model config before any array is built (clear errors, not deep tracebacks)."""
  def need(cond, msg):
    if not cond:
      raise ConfigError(f"config.model: {msg}")
  strides = tuple(cfg.strides)
  levels = len(cfg.ch_mult)
  need(len(strides) == 3, f"strides must be (coarse, medium, fine), got {strides}")
  need(all(s > 0 and s & (s - 1) == 0 for s in strides),
       f"strides must be powers of two, got {strides}")
  need(strides[0] > strides[1] > strides[2],
       f"strides must satisfy coarse > medium > fine, got {strides}")
  need(strides[0] == 2 ** (levels - 1),
       f"coarse stride {strides[0]} must be 2^(len(ch_mult)-1) = {2 ** (levels - 1)}")
  need(len(cfg.dec_ch_mult) == levels, "dec_ch_mult must have as many levels as ch_mult")
  need(cfg.codebook_size >= 2, f"codebook_size must be >= 2, got {cfg.codebook_size}")
  stages = cfg.rvq_stages
  need(isinstance(stages, int) and stages >= 1, f"rvq_stages must be an integer >= 1, got {stages!r}")
  need(cfg.rvq_init_scale >= 0, "rvq_init_scale must be >= 0")
  need(cfg.embed_dim >= 1, f"embed_dim must be >= 1, got {cfg.embed_dim}")
  for name, ch, mult in (("ch", cfg.ch, cfg.ch_mult), ("dec_ch", cfg.dec_ch, cfg.dec_ch_mult)):
    for m in mult:
      need((ch * m) % cfg.norm_groups == 0,
           f"{name} * mult = {ch * m} is not divisible by norm_groups={cfg.norm_groups}")
  need(isinstance(cfg.hyperprior.channels, int) and cfg.hyperprior.channels >= 1,
       f"hyperprior.channels must be an integer >= 1, got {cfg.hyperprior.channels!r}")
  need(isinstance(cfg.hyperprior.num_down, int) and cfg.hyperprior.num_down >= 1,
       f"hyperprior.num_down must be an integer >= 1, got {cfg.hyperprior.num_down!r}")
  ctx = cfg.hyperprior.context
  need(ctx in ("none", "coarser"), f"hyperprior.context must be 'none' or 'coarser', got {ctx!r}")
  need(ctx == "none" or (cfg.rvq_stages == 1 and cfg.hyperprior.enabled),
       "hyperprior.context='coarser' needs rvq_stages=1 and hyperprior.enabled=True")
  sp = cfg.hyperprior.spatial
  need(sp in layout.SPATIAL_PASSES,
       f"hyperprior.spatial must be one of {sorted(layout.SPATIAL_PASSES)}, got {sp!r}")
  need(sp == "none" or (cfg.rvq_stages == 1 and cfg.hyperprior.enabled),
       f"hyperprior.spatial={sp!r} needs rvq_stages=1 and hyperprior.enabled=True")
  for flag in ("mask_z", "index_bias", "index_mixture", "enabled"):
    need(isinstance(cfg.hyperprior[flag], bool), f"hyperprior.{flag} must be True or False")
  need(0 < cfg.hyperprior.sigma_min < cfg.hyperprior.sigma_max,
       "need 0 < hyperprior.sigma_min < hyperprior.sigma_max")
  need(cfg.rate_straight_through in ("exact", "scaled", "off"),
       f"rate_straight_through must be 'exact', 'scaled' or 'off', got {cfg.rate_straight_through!r}")
  need(cfg.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {cfg.dtype}")
  need(isinstance(cfg.attn_chunk, int) and cfg.attn_chunk >= 0,
       f"attn_chunk must be an integer >= 0 (0: all queries at once), got {cfg.attn_chunk!r}")


def check_ratios(ratios) -> None:
  why = layout.ratios_error(ratios)
  if why:
    raise ConfigError(why)


def pad_to_multiple(x: jax.Array, m: int) -> jax.Array:
  """Edge-pad [B, H, W, C] on the bottom/right to multiples of m."""
  h, w = x.shape[1:3]
  ph, pw = (-h) % m, (-w) % m
  if ph == 0 and pw == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


class HVQ(nn.Module):
  """Forward pass of METHOD.md; `cfg` is the frozen `config.model`."""
  cfg: Any

  def setup(self):
    c = self.cfg
    dtype = jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32
    self.encoder = Encoder(c.ch, tuple(c.ch_mult), c.num_res_blocks, tuple(c.attn_strides),
                           tuple(c.head_attn_strides), tuple(c.strides), c.embed_dim,
                           c.norm_groups, c.lambda_conditioning, dtype, c.remat,
                           int(c.attn_chunk))
    self.decoder = Decoder(c.dec_ch, tuple(c.dec_ch_mult), c.dec_num_res_blocks,
                           tuple(c.dec_attn_strides), c.norm_groups, 3, dtype,
                           c.remat, int(c.attn_chunk), bool(c.dec_mid_attn))
    stages = int(c.rvq_stages)
    # Residual stages quantise residuals: small vectors off the unit sphere, so their
    # codebooks are never normalised and start at the residual scale (rvq_init_scale).
    res_scale = float(c.rvq_init_scale) or c.codebook_init_scale
    make_cb = lambda s, name: Codebook(c.codebook_size, c.embed_dim, c.l2_normalized and s == 0,
                                       c.codebook_init_scale if s == 0 else res_scale, name=name)
    made = {}
    for k, _, s in branches(c):   # a shared codebook serves every granularity of its stage
      name = codebook_name(c, k, s)
      if name not in made:
        made[name] = make_cb(s, name)
    self.codebooks = {k: made[codebook_name(c, k, s)] for k, _, s in branches(c)}
    h = c.hyperprior
    if not h.enabled:
      self.hyper = {k: StaticIndexPrior(c.codebook_size, float(h.index_bias_scale),
                                        name=f"static_{k}") for k, _, _ in branches(c)}
      return
    bias_k = c.codebook_size if h.index_bias else 0
    self.hyper = {k: HyperBranch(c.embed_dim, h.channels, h.latent_channels, h.num_down,
                                 h.sigma_min, h.sigma_max, dtype, bias_k,
                                 float(h.index_bias_scale),
                                 bool(h.index_mixture),
                                 self.context_channels(),
                                 layout.num_passes(c) > 1, name=f"hyper_{k}")
                  for k, _, _ in branches(c)}

  def context_channels(self) -> int:
    """Channels of a prior's context map (config `hyperprior.context`; 0: none)."""
    ctx = self.cfg.hyperprior.context
    return 3 * (self.cfg.embed_dim + 1) if ctx == "coarser" else 0

  def prior_context(self, g: str, q: Dict[str, jax.Array], masks) -> jax.Array:
    """Context of granularity g's prior on its grid (hyperprior.context='coarser'): for
    each granularity decoded before it (coarser), its entries where sent and its mask,
    repeated onto g's grid; g's own mask; zeros for the rest (`layout.prior_context`).
    q {g: [B, h_g, w_g, D]} (the quantised entries), masks {g: bool [B, h_g, w_g]} ->
    [B, h_g, w_g, 3 (D + 1)] f32. The decoder has all of it before g's indices: the map,
    then coarse to fine (entropy/integer.py `context_map` is the integer twin)."""
    coarser = GRANULARITIES[:GRANULARITIES.index(g)]
    return layout.prior_context(g, masks, {o: jax.lax.stop_gradient(q[o]) for o in coarser},
                                tuple(self.cfg.strides), self.cfg.embed_dim,
                                jnp.float32(1.0), jnp)

  def spatial_context(self, g: str, entries: jax.Array, mask: jax.Array):
    """Granularity g's spatial context (hyperprior.spatial), or None without one: (the
    pass of each position int32 [h, w], for each pass p >= 1 the entries sent in earlier
    passes and their mask [P - 1, B, h, w, D + 1] f32, `layout.spatial_context`).
    entries [B, h, w, D] (each position's quantised entry), mask bool [B, h, w] (sent at
    g). entropy/integer.py `spatial_map` is the integer twin."""
    n = layout.num_passes(self.cfg)
    if n == 1:
      return None
    passes = layout.pass_map(mask.shape[1], mask.shape[2], n, jnp)
    e = jax.lax.stop_gradient(entries).astype(jnp.float32)
    return passes, jnp.stack([layout.spatial_context(e, mask, passes, p, jnp.float32(1.0), jnp)
                              for p in range(1, n)])

  def quantize(self, g: str, y: jax.Array) -> List[Tuple[str, jax.Array, Dict[str, Any]]]:
    """y [B, h, w, D] of granularity g -> [(branch key, the vector that stage quantised,
    its Codebook output)] per stage. The residual passed on is stop-gradient'ed in q
    (SoundStream / vector-quantize-pytorch), so each stage's codebook loss moves only
    its own entries."""
    out, v = [], y
    for k, gk, _ in branches(self.cfg):
      if gk != g:
        continue
      vq = self.codebooks[k](v)
      out.append((k, v, vq))
      v = vq["y"] - jax.lax.stop_gradient(vq["q_exact"])
    return out

  # ---- pieces the codec calls one at a time -------------------------------------------
  def analyze(self, x: jax.Array, lmbda: jax.Array, ratios: jax.Array) -> Dict[str, Any]:
    """Padded x [B, H, W, 3] -> continuous y per granularity and the granularity map."""
    y = self.encoder(x, jnp.log(lmbda.astype(jnp.float32)))
    gmap = granularity.granularity_map(x, ratios, self.cfg.strides[0],
                                       self.cfg.granularity_bins)
    return dict(y=y, gmap=gmap)

  # Methods taking `g` take a branch key (model.branches); stage 0's key is the granularity.
  def prior(self, g: str, z_hat: jax.Array, grid_hw, ctx=None, spatial=None) -> tuple:
    """(mu, sigma) of branch g from its z_hat (and, with hyperprior.context, its
    `prior_context`; with hyperprior.spatial, its `spatial_context`)."""
    return self.hyper[g].synthesis(z_hat, grid_hw, ctx, spatial)

  def codebook_entries(self, g: str) -> jax.Array:
    return self.codebooks[g].entries()

  def index_log_prior(self, g: str) -> jax.Array:
    """Static per-entry logits of granularity g's index model: [K] (zeros without)."""
    b = self.hyper[g].log_prior()
    return jnp.zeros((self.cfg.codebook_size,), jnp.float32) if b is None else b

  def index_mixture_logit(self, g: str) -> jax.Array:
    """The static histogram's mixture logit (-inf: no mixture)."""
    m = self.hyper[g].mixture_logit()
    return jnp.asarray(-jnp.inf, jnp.float32) if m is None else m

  def encode_latents(self, x: jax.Array, lmbda: jax.Array, ratios: jax.Array) -> Dict[str, Any]:
    """Padded x -> map, indices {branch: [B, h_g, w_g]} and continuous z {branch: [B, ., ., C_z]}."""
    a = self.analyze(x, lmbda, ratios)
    hyper_on = self.cfg.hyperprior.enabled
    idx, z = {}, {}
    for g in GRANULARITIES:
      for k, v, vq in self.quantize(g, a["y"][g]):
        idx[k] = vq["indices"]
        if hyper_on:
          z[k] = self.hyper[k].analysis(v)
    return dict(gmap=a["gmap"], indices=idx, z=z)

  def z_likelihoods(self, g: str, support: jax.Array) -> jax.Array:
    """P(z_hat = n) for n in `support` [n] and every channel -> [C_z, n] (table building)."""
    c = self.cfg.hyperprior.latent_channels
    grid = jnp.broadcast_to(support.astype(jnp.float32)[:, None], (support.shape[0], c))
    return self.hyper[g].bottleneck.likelihood(grid).T

  def decode_latents(self, indices: Dict[str, jax.Array], gmap: jax.Array, out_hw) -> jax.Array:
    """Indices {branch} + map -> image [B, H, W, 3] in [-1, 1] at the padded size `out_hw`."""
    q = {g: 0.0 for g in GRANULARITIES}
    for k, g, _ in branches(self.cfg):   # residual stages add up
      q[g] = q[g] + jnp.take(self.codebooks[k].entries(), indices[k], axis=0)
    return self.synthesize(q, gmap, out_hw)

  def synthesize(self, q: Dict[str, jax.Array], gmap: jax.Array, out_hw) -> jax.Array:
    """Quantised embeddings {g: [B, h_g, w_g, D]} + map -> image [B, H, W, 3] (padded size)."""
    strides = tuple(self.cfg.strides)
    masks = layout.sent_masks(gmap, strides, jnp)
    s_f = strides[-1]
    merged = 0.0
    for g, s in zip(GRANULARITIES, strides):
      v = q[g] * masks[g][..., None].astype(q[g].dtype)
      f = s // s_f
      merged = merged + jnp.repeat(jnp.repeat(v, f, axis=1), f, axis=2)
    f = strides[0] // s_f
    onehot = jax.nn.one_hot(jnp.repeat(jnp.repeat(gmap, f, axis=1), f, axis=2), 3)
    return self.decoder(jnp.concatenate([merged, onehot], axis=-1), out_hw)

  # ---- the whole forward ----------------------------------------------------------------
  def __call__(self, x: jax.Array, lmbda: jax.Array, ratios: jax.Array,
               training: bool = False, prior: str = "hyper") -> Dict[str, Any]:
    """x [B, H, W, 3] in [-1, 1] (any H, W); lmbda [B]; ratios [3] (coarse, medium, fine).
    `prior` prices the indices: 'hyper' (the hyperprior, where the config has one) or
    'static' (each branch's static logits alone, no z: the staged recipe's tokenizer phase).

    Returns recon [B, H, W, 3] f32, indices {branch: [B, h_g, w_g]}, masks {g: same},
    gmap [B, hc, wc],
    bits {y_coarse, y_medium, y_fine, z, map} each [B], bpp [B], VQ losses, usage.
    """
    c = self.cfg
    b, H, W, _ = x.shape
    xp = pad_to_multiple(x, c.strides[0])
    a = self.analyze(xp, lmbda, ratios)
    gmap = a["gmap"]
    masks = layout.sent_masks(gmap, tuple(c.strides), jnp)
    bits, q, indices, mu_sigma = {}, {}, {}, {}
    cb_loss = commit_loss = 0.0
    z_bits = jnp.zeros((b,), jnp.float32)
    zm = layout.z_masks(masks, c.hyperprior.num_down, jnp) if c.hyperprior.mask_z else {}
    hyper_on = c.hyperprior.enabled and prior == "hyper"
    for g in GRANULARITIES:
      m = masks[g].astype(jnp.float32)
      any_sent = (jnp.sum(m, axis=(1, 2)) > 0).astype(jnp.float32)
      stages = self.quantize(g, a["y"][g])
      bits[f"y_{g}"] = jnp.zeros((b,), jnp.float32)
      for k, v, vq in stages:
        idx = vq["indices"]
        if hyper_on:
          ctx = self.prior_context(g, q, masks) if self.context_channels() else None
          # each index is priced by the prior of the pass it is coded in
          hp = self.hyper[k](v, training, zm.get(g), ctx,
                             self.spatial_context(g, vq["q_exact"], masks[g]))
          per_pos = rate.index_bits(hp["mu"], hp["sigma"], self.codebooks[k].entries(), idx,
                                    y=vq["y"],
                                    chunk_size=c.rate_chunk or None,
                                    straight_through_mode=c.rate_straight_through,
                                    log_prior=self.hyper[k].log_prior(),
                                    mix_logit=self.hyper[k].mixture_logit())
          # z of a branch is sent only when that granularity has a sent position (and
          # with mask_z only where it has one).
          z_bits = z_bits + jnp.sum(hp["z_bits"], axis=(1, 2, 3)) * any_sent
          mu_sigma[k] = (hp["mu"], hp["sigma"])
        else:   # a static learned code, no side information
          per_pos = rate.static_bits(self.hyper[k].log_prior(), idx)
        bits[f"y_{g}"] = bits[f"y_{g}"] + jnp.sum(per_pos * m, axis=(1, 2))
        # mean over branches: the VQ terms keep their weight whatever rvq_stages is
        cb_loss = cb_loss + vq["codebook_loss"] / len(branches(c))
        commit_loss = commit_loss + vq["commitment_loss"] / len(branches(c))
        indices[k] = idx
      # the decoder sees the sum of the stages' entries, straight-through to y
      y_in = stages[0][2]["y"]
      q_sum = sum(vq["q_exact"] for _, _, vq in stages)
      q[g] = y_in + jax.lax.stop_gradient(q_sum - y_in)
    bits["z"] = z_bits
    bits["map"] = granularity.map_bits(gmap, ratios)
    total = sum(bits.values())
    recon = self.synthesize(q, gmap, xp.shape[1:3])[:, :H, :W]
    return dict(recon=recon, indices=indices, masks=masks, gmap=gmap, bits=bits,
                bpp=total / (H * W), codebook_loss=cb_loss, commitment_loss=commit_loss,
                prior=mu_sigma, y=a["y"])


def build(model_cfg: ml_collections.ConfigDict) -> HVQ:
  validate(model_cfg)
  return HVQ(ml_collections.FrozenConfigDict(model_cfg))


def init_params(model: HVQ, rng: jax.Array, image_size: int = 64, lmbda: float = 1.0):
  """Initialise params with a dummy batch (plain pytree, f32)."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  ratios = jnp.array([0.1, 0.4, 0.5], jnp.float32)
  init = jax.jit(lambda r: model.init({"params": r, "noise": r}, x, jnp.full((1,), lmbda),
                                      ratios, training=False)["params"])
  return init(rng)
