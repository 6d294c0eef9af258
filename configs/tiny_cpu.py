"""Tiny HVQ-CGIC that trains on 2 CPU cores in minutes on the bundled photos.

Same structure as the default (three granularities, hyperpriors, lambda conditioning);
small channels, K=256, 96 px crops; LPIPS and the GAN off (no weights offline, and
the GAN needs far more steps than a CPU demo has).
"""
from hvq_jax.configs import default


def get_config():
  config = default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = 32, (1, 1, 2, 2, 2), 1
  m.dec_ch, m.dec_ch_mult, m.dec_num_res_blocks = 32, (1, 1, 2, 2, 2), 1
  m.norm_groups = 8
  # A fully convolutional encoder: its codes keep the same statistics at any image size
  # (attention over 16 tokens in training and ~1000 on a whole photo shifts them, and a
  # prior trained on crops then misprices whole photos: results/FINDINGS.md).
  m.attn_strides, m.head_attn_strides = (), ()
  # The decoder keeps its stride-16 attention (chunked: memory linear in pixels, compute
  # quadratic in tokens). A demo trained without it (same recipe and seed) on the corpus's
  # 16 held-out photos, whole, six ratios: PSNR -0.42 dB (per photo -2.59 to +0.40) at 6%
  # more bits, LPIPS +0.002, DISTS -0.008, saving 28.1% vs 30.4%. With it, decoding costs
  # 2.4x more per megapixel at 12 MP than at 0.26 MP, without it 1.6x (docs/benchmarks.md).
  # A run that codes mostly 12 MP photos may train with
  # --config.model.dec_attn_strides='()' --config.model.dec_mid_attn=False.
  m.codebook_size = 256
  m.codebook_init_scale = 1.0   # entries at the encoder's output scale: codes live from step 0
  m.l2_normalized = True        # bounded VQ loss: unnormalised codes drifted away from y here
  # Residual-VQ ablation only: stage-0 residuals of the trained tiny model have a per-dim
  # std of 0.06 (coarse) to 0.17 (fine); U(-0.2, 0.2) has std 0.12.
  m.rvq_init_scale = 0.2
  # z: 4 channels per 8x8 block of each grid (8 per 4x4 cost more bits than the prior
  # saved at this size).
  m.hyperprior.channels, m.hyperprior.latent_channels, m.hyperprior.num_down = 32, 4, 3
  m.rate_chunk = 0
  # the prior reads the map and the coarser decoded entries: trained on a frozen tokenizer
  # it priced the same indices 5-15% lower than without (three seeds, results/FINDINGS.md)
  m.hyperprior.context = "coarser"
  # and each granularity's indices come in four passes of a 2x2 interleave, each pass's
  # prior reading the entries already sent: on two frozen corpus tokenizers, 1440 prior
  # steps, the same indices cost 39.6% fewer bits than the static code against 28.5% with
  # two checkerboard passes (results/prior_length/); decode +22% over the coarser context
  # alone (results/spatial_context/)
  m.hyperprior.spatial = "quad"
  config.image_size = 96          # z grid of the fine branch: 3x3 (less border than 2x2)
  config.granularity.train_ratios = ((0.0, 0.2, 0.8), (0.1, 0.4, 0.5), (0.3, 0.4, 0.3),
                                     (0.5, 0.3, 0.2), (0.7, 0.2, 0.1), (0.9, 0.1, 0.0))
  config.rd.lambdas = (0.05, 0.2, 0.8)
  config.rd.lmbda = 0.2
  t = config.train
  # staged: 960 tokenizer steps at the static code's rate, then 480 prior steps on the frozen
  # tokenizer. A prior step costs at most half a tokenizer step here (0.26 of one), so the
  # run takes no longer than 1200 tokenizer steps: the hyperprior-off and joint variants'
  # budget (configs/ablations.py), the comparison of results/recipe_default/.
  t.batch_size, t.num_steps, t.log_every, t.ckpt_every = 4, 1440, 50, 240
  t.lr, t.disc_lr, t.b1, t.b2, t.warmup_steps = 1e-3, 1e-3, 0.9, 0.99, 100
  t.prior_fraction, t.prior_lr, t.finetune_lr = 1 / 3, 1e-3, 1e-4
  # colour augmentation: the bundled training photos have few greens and blues; a mild
  # hue rotation and chroma scale lower the colour shift, a full hue turn is too hard a
  # task for this model (results/FINDINGS.md, "Colour").
  config.data.color_hue_deg, config.data.color_saturation = 30.0, 0.2
  config.loss.w_lpips = 0.0
  config.loss.w_gan = 0.0
  config.loss.disc_start = 1000
  config.disc.ch = 32
  return config
