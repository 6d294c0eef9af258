"""Paper-scale HVQ-CGIC: Control-GIC's base model plus per-granularity hyperpriors.

Codebook K=1024, D=4 as in Control-GIC (the large-codebook K=16384 is an ablation):
the index model is then a 1024-way softmax over 4-D distances, cheap at any size.
"""
import ml_collections


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Encoder (Control-GIC): 5 levels at strides 1..16, 2 ResBlocks each.
      ch=128, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=2, attn_strides=(16,),
      head_attn_strides=(16, 8),           # no attention in the stride-4 head (quadratic)
      # Decoder (MoVQ-style, conditioned on the merged code map).
      dec_ch=128, dec_ch_mult=(1, 2, 2, 4, 4), dec_num_res_blocks=2, dec_attn_strides=(16,),
      dec_mid_attn=True,                   # the middle block's global attention (top stride)
      norm_groups=32,
      strides=(16, 8, 4),                  # coarse, medium, fine
      granularity_bins=32,
      # Vector quantiser.
      codebook_size=1024, embed_dim=4, shared_codebook=True, l2_normalized=False,
      codebook_init_scale=0.0,             # U(-s, s); 0 means taming's s = 1/K
      rvq_stages=1,                        # > 1: residual VQ, a hyperprior per stage (ablation)
      rvq_init_scale=0.0,                  # residual codebooks' U(-s, s); 0: codebook_init_scale
      # Rate model.
      lambda_conditioning=True,
      rate_straight_through="scaled",      # exact | scaled | off (see rate.py)
      rate_chunk=1024,                     # positions per example priced at once ([B, chunk, K] logits)
      # z: 8 channels per 4x4 block of D=4 vectors (<= 16 indices of log2 K bits): side
      # information must stay well below what it saves.
      hyperprior=dict(enabled=True,        # False: static learned histogram, no z (ablation)
                      channels=128, latent_channels=8, num_down=2,
                      sigma_min=1e-4, sigma_max=1e2,
                      mask_z=True,         # send z only where its granularity is sent
                      index_bias=True,     # + a learned static logit per entry (rate.py)
                      index_bias_scale=30.0,
                      index_mixture=True,  # mix with the static histogram (rate.py)
                      # 'coarser': each granularity's prior also reads the coarser
                      # granularities' decoded entries and the map (hyperprior.py)
                      context="none",
                      # 'checkerboard' | 'quad': each granularity's indices are coded in
                      # 2 / 4 interleaved passes, each pass's prior also reading the
                      # entries of that granularity decoded in earlier passes
                      # (hyperprior.py; 'none': one pass)
                      spatial="none"),
      dtype="float32",                     # compute dtype (params stay float32)
      remat=False,                         # rematerialise encoder/decoder ResBlocks
      # attention queries computed at once, each against every key (nn/layers.py
      # attention): a [attn_chunk, tokens] score block, so memory stays linear in the
      # tokens; an image of up to attn_chunk tokens per attention is one block
      attn_chunk=1024,
  ))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config()
  # ratios: the (coarse, medium, fine) fractions coded by default; train_ratios: the
  # ratios training draws from, one per step (empty: train at `ratios`). A prior that
  # prices every ratio a user may ask for has to see them: trained at one ratio only, the
  # staged prior saved 7-12% at fine-heavy ratios and lost up to 45% at coarse-heavy ones
  # (results/FINDINGS.md).
  config.granularity = ml_collections.ConfigDict(dict(ratios=(0.1, 0.4, 0.5), train_ratios=()))
  config.rd = ml_collections.ConfigDict(dict(lambdas=(0.5, 1.0, 2.0, 4.0), lmbda=1.0))
  config.image_size = 256                 # training crop (multiple of the coarse stride)
  config.train = ml_collections.ConfigDict(dict(
      batch_size=8,                       # global
      num_steps=500_000, log_every=100, ckpt_every=5000, keep=3, keep_best=1,
      async_checkpoint=True,
      lr=5e-5, disc_lr=5e-5, b1=0.5, b2=0.9,          # Control-GIC's Adam
      warmup_steps=5000, final_lr_frac=0.1, grad_clip=1.0,
      ema_decay=0.0, max_bad_steps=20,
      grad_accum=1,                       # micro-batches per update (batch_size / grad_accum each)
      # The recipe (training/phases.py, docs/method.md): 'staged' trains the tokenizer
      # priced by its static code, then the prior alone on the frozen tokenizer (the
      # prior_fraction of the steps, at prior_lr), then everything jointly (the
      # finetune_fraction, at finetune_lr); 'joint' is the paper's one joint run.
      recipe="staged", prior_fraction=0.1, prior_lr=5e-5, finetune_fraction=0.0,
      finetune_lr=5e-6,
      # Start a fresh run from another run's params (matched by name; the rest keep their
      # init), and train only part: 'all', or 'prior' (hyperprior branches / static
      # histograms: a plug-in prior for a frozen tokenizer, rate loss only).
      init_from="", trainable="all",
  ))
  config.loss = ml_collections.ConfigDict(dict(
      rec="l1", w_rec=1.0, w_lpips=1.0, lpips_net="alexnet", lpips_weights="",
      w_gan=0.1, disc_start=50_000, beta=0.25,
  ))
  config.disc = ml_collections.ConfigDict(dict(ch=64, n_layers=2))
  config.data = ml_collections.ConfigDict(dict(
      source="bundled",                   # bundled | folder | tfds
      train_dir="", eval_dir="",
      tfds_name="", tfds_split="train", tfds_eval_split="validation", tfds_data_dir="",
      min_scale=0.5, flip=True,
      # grain worker processes making batches; -1: auto (training/data.py auto_num_workers:
      # min(cores - 1, 8) on an accelerator, 0 on the CPU backend, where XLA computes the
      # step on those cores); each (or this process, without workers) makes read_threads
      # batches at once (-1: auto, data.read_threads) and keeps up to
      # max(worker_buffer_size, read_threads) of them ready
      num_workers=-1, worker_buffer_size=2, read_threads=-1,
      # batches on the device ahead of the step, counting the one it consumes (2: the next
      # batch is copied while the current step runs); also how many steps the host may
      # dispatch ahead of the device
      device_prefetch=2,
      # colour augmentation (training/data.py ColorJitter): hue rotation +- deg, chroma
      # scale 1 +- s, RGB permutation probability; 0 turns each off
      color_hue_deg=0.0, color_saturation=0.0, color_permute=0.0,
  ))
  # held-out figures at the end of training: centre crops of image_size; a TFDS eval
  # split contributes its first num_images
  config.eval = ml_collections.ConfigDict(dict(enabled=True, image_size=256, num_images=16))
  # Device mesh (sharding.py): batch over data x fsdp, large params split over fsdp.
  config.mesh = ml_collections.ConfigDict(dict(
      axes=("data", "fsdp"), shape=(-1, 1), fsdp_min_size=2 ** 18))
  # Real entropy coding (hvq_jax/codec, entropy/integer.py): z_hat is clipped to
  # [-z_range, z_range] before it is coded; the integer hyper-synthesis' weight precision;
  # the largest image accepted (the container's limit, 64 MP); index-weight positions
  # built at once on the device; the memory one image may take (GB; 0: 75% of the
  # device's), from which the largest codable size follows (codec/memory.py
  # memory_estimate: linear in the pixel count, mostly the full-resolution feature maps).
  config.codec = ml_collections.ConfigDict(dict(
      z_range=64, weight_bits=12, max_pixels=8192 * 8192, index_chunk=2048,
      memory_budget_gb=0.0))
  return config
