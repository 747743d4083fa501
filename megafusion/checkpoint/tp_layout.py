"""How full (HF-layout) weights map to and from megafusion's per-TP-rank shards.

Pure tensor functions, shared by the HF importer, exporters and tests, so the
layout is defined in exactly one place:

    column-parallel  : rows [rank * out/tp, (rank+1) * out/tp)
    row-parallel     : columns [rank * in/tp, (rank+1) * in/tp)
    fused qkv        : [q rows of rank; k rows of rank; v rows of rank]
    fused gate_up    : [gate rows of rank; up rows of rank]
    vocab (emb/head) : vocab padded with zero rows to ``padded``, then rows by rank
"""

from __future__ import annotations

import torch


def _chunk(size: int, tp: int, rank: int) -> tuple[int, int]:
    if size % tp:
        raise ValueError(f"dimension {size} is not divisible by tensor-parallel size {tp}")
    step = size // tp
    return rank * step, (rank + 1) * step


def column_shard(w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    a, b = _chunk(w.shape[0], tp, rank)
    return w[a:b]


def row_shard(w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    a, b = _chunk(w.shape[1], tp, rank)
    return w[:, a:b]


def qkv_shard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([column_shard(q, tp, rank), column_shard(k, tp, rank), column_shard(v, tp, rank)], 0)


def qkv_unshard(shards: list[torch.Tensor], q_rows: int, kv_rows: int) -> tuple[torch.Tensor, ...]:
    """Inverse of qkv_shard over all ranks; q_rows/kv_rows are the *full* q and k row counts."""
    tp = len(shards)
    qs, ks, vs = zip(*(s.split([q_rows // tp, kv_rows // tp, kv_rows // tp], 0) for s in shards))
    return torch.cat(qs, 0), torch.cat(ks, 0), torch.cat(vs, 0)


def gate_up_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([column_shard(gate, tp, rank), column_shard(up, tp, rank)], 0)


def gate_up_unshard(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    gates, ups = zip(*(s.chunk(2, 0) for s in shards))
    return torch.cat(gates, 0), torch.cat(ups, 0)


def vocab_shard(full: torch.Tensor, padded: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's rows of ``full`` [V, h] zero-padded to ``padded`` rows (inverse of vocab_unshard)."""
    full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])  # [V_pad, h]
    return column_shard(full, tp, rank)


def vocab_unshard(shards: list[torch.Tensor], vocab: int) -> torch.Tensor:
    return torch.cat(shards, 0)[:vocab]
