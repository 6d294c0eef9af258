"""Flax modules: layers, encoder, decoder, codebook, granularity map, hyperprior, the model, LPIPS."""
