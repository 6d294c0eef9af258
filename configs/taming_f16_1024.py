"""taming-transformers' f16 VQGAN (ImageNet, K=1024, D=256) as our model: what
`hvq import --from taming` fills exactly, and the plug-in prior trained on it.

Taming's config: ch 128, ch_mult (1, 1, 2, 2, 4), 2 ResBlocks per level, attention at
stride 16 (attn_resolutions [16] at resolution 256), z_channels 256, embed_dim 256,
n_embed 1024. It has ONE grid, at stride 16: that is our coarse granularity, so every
patch is sent coarse (ratios (1, 0, 0)); the medium and fine heads exist but are never
used. Its encoder's mid block + norm_out + conv_out (with quant_conv) is our coarse head
(ResBlock-Attn-ResBlock, so head attention at 16 only), its decoder our decoder with the
spatial norms reduced to its GroupNorms (interop/import_weights.py).

  hvq import --from taming --checkpoint last.ckpt --out runs/f16_1024   # picks this config
  hvq train --config configs/taming_f16_1024.py --workdir runs/f16_1024_prior \
      --config.train.init_from=runs/f16_1024 --config.train.trainable=prior

Training settings are the plug-in prior's (the tokenizer frozen, rate loss only): no
LPIPS or GAN (they would only cost time), and Adam at the tiny config's rate. To
fine-tune the tokenizer itself (trainable=all), switch loss.w_lpips/w_gan back on.
"""
from hvq_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.update(
      ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_strides=(16,),
      head_attn_strides=(16,),
      dec_ch=128, dec_ch_mult=(1, 1, 2, 2, 4), dec_num_res_blocks=2, dec_attn_strides=(16,),
      norm_groups=32, strides=(16, 8, 4),
      codebook_size=1024, embed_dim=256, shared_codebook=True, l2_normalized=False,
      rvq_stages=1, lambda_conditioning=False)
  config.granularity.ratios = (1.0, 0.0, 0.0)
  config.rd.lambdas, config.rd.lmbda = (1.0,), 1.0   # no lambda conditioning: one rate
  t = config.train
  t.num_steps, t.warmup_steps, t.lr, t.b1, t.b2 = 20_000, 500, 1e-3, 0.9, 0.99
  t.batch_size, t.ckpt_every = 16, 2000
  config.loss.w_lpips = 0.0
  config.loss.w_gan = 0.0
  # the integer index weights of a chunk of positions take chunk x K x D int32: 0.5 GB
  config.codec.index_chunk = index_chunk(config.model)
  return config


def index_chunk(model_cfg) -> int:
  """Positions coded at once so that chunk x K x D int32 stays near 0.5 GB (D=256: the
  default 2048 would need 2 GB at K=1024 and 34 GB at K=16384)."""
  per_position = model_cfg.codebook_size * model_cfg.embed_dim * 4
  return max(8, min(2048, 2 ** int(0.5e9 // per_position).bit_length() // 2))
