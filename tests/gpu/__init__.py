"""The GPU tier: bf16 and CUDA-kernel checks that the CPU suite cannot make (``make test-gpu``)."""
