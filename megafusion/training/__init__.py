"""Training: the smoke run today; the megatron-scheduled DeepSpeed trainer comes with issue 4."""
