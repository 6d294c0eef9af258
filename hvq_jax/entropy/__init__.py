"""Entropy modelling and coding: the training-time rate model, Ballé's bottleneck, the
integer entropy-parameter path shared by every decoder, and the .hvq container."""
