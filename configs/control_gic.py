"""Control-GIC's released model (lianqi1008/Control-GIC, configs/config_inference.yaml) as
our model: what `hvq import --from control-gic` fills.

Encoder: ch 128, ch_mult (1, 2, 2, 4, 4), 2 ResBlocks per level, attention at stride 8
(attn_resolutions [32] at resolution 256); three heads, each ResBlock-Attn-ResBlock
(attention in all three, the fine one at stride 4: quadratic in pixels), D=4, K=1024.
Decoder: the same widths, attention at stride 8 of the upsampling path. Trained at
ratios (0.1, 0.4, 0.5). The encoder, heads and codebook import exactly; the decoder's
stems do not (interop/import_weights.py), so before its reconstructions mean anything
the decoder needs fine-tuning (`--config.train.init_from=...`, trainable=all, LPIPS and
the GAN on, as Control-GIC trained it); a plug-in prior's bits do not depend on it.
"""
from hvq_jax.configs import default


def get_config():
  config = default.get_config()
  config.model.update(
      ch=128, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=2, attn_strides=(8,),
      head_attn_strides=(16, 8, 4),
      dec_ch=128, dec_ch_mult=(1, 2, 2, 4, 4), dec_num_res_blocks=2, dec_attn_strides=(8,),
      norm_groups=32, strides=(16, 8, 4),
      codebook_size=1024, embed_dim=4, shared_codebook=True, l2_normalized=False,
      rvq_stages=1, lambda_conditioning=False)
  config.granularity.ratios = (0.1, 0.4, 0.5)
  config.rd.lambdas, config.rd.lmbda = (1.0,), 1.0   # no lambda conditioning: one rate
  return config
