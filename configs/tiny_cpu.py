"""Tiny HVQ-CGIC that trains on 2 CPU cores in minutes on the bundled photos."""
from configs import default


def get_config():
  config = default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks = 32, (1, 1, 2, 2, 2), 1
  m.dec_ch, m.dec_ch_mult, m.dec_num_res_blocks = 32, (1, 1, 2, 2, 2), 1
  m.norm_groups = 8
  m.codebook_size = 256
  m.hyperprior.channels, m.hyperprior.latent_channels = 32, 8
  m.rate_chunk = 0
  config.image_size = 64
  return config
