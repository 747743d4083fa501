"""A training layout (TP x PP x VPP x DP and the options that change memory), and where layers sit in it.

One type for every tool that reasons about layouts: the memory planner proposes them, the
resharder re-cuts checkpoints for them, the converter writes them. Whether a layout is valid
for a config is decided in one place, :func:`megafusion.config.validate.config_problems`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megafusion.config.schema import Config


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    zero_stage: int = 1
    micro_batch_size: int = 1

    def __str__(self) -> str:
        s = f"TP{self.tp} PP{self.pp}" + (f"xVPP{self.vpp}" if self.vpp > 1 else "") + f" DP{self.dp}"
        return (
            s
            + (" SP" if self.sequence_parallel else "")
            + (" AC" if self.activation_checkpointing else "")
            + f" ZeRO-{self.zero_stage} mb{self.micro_batch_size}"
        )

    @property
    def model_parallel(self) -> str:
        """The model-parallel cut alone, as checkpoints record it: 'TP=2 PP=2 VPP=2'."""
        return f"TP={self.tp} PP={self.pp}" + (f" VPP={self.vpp}" if self.vpp > 1 else "")


def layout_of(cfg: Config, world: int) -> Layout:
    """The layout ``cfg.parallel`` asks for on ``world`` ranks (DP derived when ``data_parallel`` is -1)."""
    p = cfg.parallel
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    dp = p.data_parallel if p.data_parallel > 0 else max(1, world // (tp * pp))
    return Layout(
        tp,
        pp,
        dp,
        p.virtual_pipeline_stages or 1,
        p.sequence_parallel,
        p.activation_checkpointing,
        p.zero_stage,
        cfg.data.micro_batch_size,
    )


def with_layout(cfg: Config, lay: Layout) -> Config:
    """``cfg`` with its parallel section (and micro-batch size) set to ``lay``."""
    par = replace(
        cfg.parallel,
        tensor_parallel=lay.tp,
        pipeline_parallel=lay.pp,
        data_parallel=lay.dp,
        virtual_pipeline_stages=lay.vpp if lay.vpp > 1 else None,
        sequence_parallel=lay.sequence_parallel,
        activation_checkpointing=lay.activation_checkpointing,
        zero_stage=lay.zero_stage,
    )
    return replace(cfg, parallel=par, data=replace(cfg.data, micro_batch_size=lay.micro_batch_size))


def layer_ids_for_chunk(num_layers: int, pp: int, vpp: int, pp_rank: int, chunk: int) -> list[int]:
    """Global layer indices of virtual chunk ``chunk`` on pipeline rank ``pp_rank`` (megatron-core order)."""
    per = num_layers // (pp * vpp)
    start = chunk * (num_layers // vpp) + pp_rank * per
    return list(range(start, start + per))
