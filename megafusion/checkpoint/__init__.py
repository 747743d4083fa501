"""Checkpoint formats: HF Llama import, TP shard layout."""
