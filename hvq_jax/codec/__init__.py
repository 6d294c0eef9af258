"""Real compression: image -> .hvq bytes -> image, with a model loaded from a checkpoint.

    m = hvq_jax.codec.load_model("runs/tiny_cpu")
    data = hvq_jax.codec.compress(m, image)          # uint8 [H, W, 3] -> bytes
    image = hvq_jax.codec.decompress(m, data)
"""
from hvq_jax.codec.coder import (compress, decode_indices, decompress, encode_latents,
                                 pad_image, prepare_image, search_rate)
from hvq_jax.checkpoint import CheckpointCorrupt
from hvq_jax.codec.model import (CheckpointError, CodecModel, build_tables,
                                 fingerprint, load_model, load_params)
from hvq_jax.entropy.bitstream import BitstreamError

__all__ = ["compress", "decompress", "decode_indices", "encode_latents", "pad_image",
           "prepare_image", "search_rate", "CheckpointError", "CheckpointCorrupt", "CodecModel",
           "build_tables", "fingerprint", "load_model", "load_params", "BitstreamError"]
