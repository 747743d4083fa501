"""The LlamaFusion math: routing, masks, RoPE, norms, image I/O, layers, the model."""
