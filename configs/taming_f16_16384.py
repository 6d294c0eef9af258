"""taming-transformers' f16 VQGAN with the large codebook (ImageNet, K=16384, D=256):
`configs/taming_f16_1024.py` with n_embed 16384, everything else the same."""
from hvq_jax.configs import taming_f16_1024


def get_config():
  config = taming_f16_1024.get_config()
  config.model.codebook_size = 16384
  config.codec.index_chunk = taming_f16_1024.index_chunk(config.model)
  return config
