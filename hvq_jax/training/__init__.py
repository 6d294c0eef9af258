"""Training: the G/D step, losses, discriminator, grain data, meshes and sharding."""
