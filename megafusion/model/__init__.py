"""The LlamaFusion math on one rank: modality routing and the routed column/row-parallel projections,
the hybrid attention mask, RoPE, norms, image I/O (U-Nets / patchifier), layers, the KV cache the
layers write, and the model. Takes a parallel context; creates no process group."""
