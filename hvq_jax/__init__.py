"""hvq_jax: HVQ-CGIC, a VQGAN image codec with hyperprior-coded indices, in JAX/Flax."""
__version__ = "0.1.0"
