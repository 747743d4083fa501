"""Inference: KV-cached text generation, image sampling with a cached text prefix, captioning."""
