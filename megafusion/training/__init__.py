"""Training: pipeline stages for megatron-core's schedules (``stages``), the DeepSpeed ZeRO engine over
the trainable parameters (``engine``), the trainer loop with checkpoints, resume and preemption
(``trainer``), the learning-rate schedule, the FLOPs count (``flops``) and step metrics."""
