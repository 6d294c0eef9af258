"""The micro model: the tiny CPU config shrunk until its programs compile in seconds.

Tests, the checkpoint-fault harness and the codec fuzzer build it; nothing trains it for
quality. `shrink` applies the micro sizes to any config (an ablation variant, say).
"""
from hvq_jax.configs import tiny_cpu


def shrink(config):
  """Micro widths, K=64 and a 16/4-channel hyperprior, in place; returns `config`."""
  m = config.model
  m.ch, m.dec_ch, m.norm_groups = 16, 16, 4
  m.codebook_size = 64
  m.hyperprior.channels, m.hyperprior.latent_channels = 16, 4
  return config


def get_config():
  config = shrink(tiny_cpu.get_config())
  m = config.model
  # the decoder attends, so the tests and the PyTorch parity cover attention blocks
  m.dec_mid_attn, m.dec_attn_strides = True, (16,)
  # one phase and a prior without contexts: the loop, resume and codec tests need neither
  # (test_phases, test_prior_context and test_spatial_context build them)
  config.train.recipe = "joint"
  m.hyperprior.context, m.hyperprior.spatial = "none", "none"
  config.granularity.train_ratios = ()
  return config


def train_config(num_steps: int = 3):
  """The micro model as the training tests run it: 64 px, batch 2, past warmup from step
  1, two accumulated micro-batches, the GAN on from step 0, checkpoints every 2 steps."""
  config = get_config()
  config.image_size = 64
  t = config.train
  t.batch_size, t.num_steps = 2, num_steps
  t.log_every, t.ckpt_every, t.keep = 1, 2, 10
  t.async_checkpoint = False
  t.warmup_steps = 1          # steps 2 and 3 run on the cosine decay, past warmup
  t.grad_accum = 2            # two micro-batches of one image
  config.loss.w_gan, config.loss.disc_start = 0.1, 0   # GAN and adaptive weight from step 0
  config.eval.enabled = False
  return config
