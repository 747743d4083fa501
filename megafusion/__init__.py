"""megafusion: LlamaFusion (LMFusion) on megatron-core, DeepSpeed, Ray and SLURM.

``from megafusion import LlamaFusion`` is the one-process entry point (``megafusion.api``); the
import is lazy so ``megafusion.config`` stays usable (config validation before spawning)
without importing torch/megatron.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LlamaFusion":
        from megafusion.api import LlamaFusion

        return LlamaFusion
    if name == "FusionBatch":
        from megafusion.model.batch import FusionBatch

        return FusionBatch
    raise AttributeError(f"module 'megafusion' has no attribute {name!r}")


__all__ = ["LlamaFusion", "FusionBatch", "__version__"]
