"""Parallel plumbing, knowing nothing of LlamaFusion layers: torch.distributed and megatron-core process
groups (``process_groups``), the megatron-core config (``megatron_config``), the CPU bridge for
megatron-core's CUDA-only spots, collective helpers (``grads``) and the layout type (``layout``)."""
