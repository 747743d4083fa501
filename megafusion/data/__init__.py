"""Batches for training: synthetic packed batches now, the latent-shard loader later."""
