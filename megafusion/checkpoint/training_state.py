"""Resumable training checkpoints: atomic, sharded per rank, nothing pickled.

Layout of one checkpoint ``<save>/step_00000100/``::

    meta.json                        step, data position, layout, counters (JSON)
    index.json                       every shard's size and sha256, and its tensors' shapes/dtypes
    config.yaml                      the resolved config
    model/tp{t}_pp{p}.safetensors    trainable parameters of that TP/PP shard (written by DP rank 0)
    optim/tp{t}_pp{p}_dp{d}.safetensors   this rank's ZeRO partition: fp32 master + Adam moments
    optim/tp{t}_pp{p}_dp{d}.json     step counts and partition sizes of that file
    rng/rank{r}.safetensors          torch CPU (and CUDA) generator states

The frozen text tower is not copied into checkpoints: it is bit-identical to
``checkpoint.hf_llama`` (recorded in meta.json with its file sizes, checked on
resume) and is reloaded from there. (The Transfusion-style baseline trains its text tower,
so there every weight is in ``model/``.) Everything is written into ``step_XXXXXXXX.tmp`` first;
rank 0 renames the folder once every rank has finished and only then rewrites
the ``latest`` pointer (via a temporary file and ``os.replace``), so a crash at
any point leaves ``latest`` on the previous complete checkpoint.

Loading verifies each file a rank reads against index.json (size, sha256): a
truncated or corrupted shard is an error naming the file. What the format
trusts: safetensors files hold raw tensors only and JSON/YAML hold plain data;
loading never unpickles anything.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors.torch import load_file, save_file

from megafusion.checkpoint.files import (
    INDEX,
    LATEST,
    CheckpointError,
    file_digest,
    verify_file,
    write_json,
)
from megafusion.checkpoint.tensor_file import TensorFile
from megafusion.config.loader import dump_config
from megafusion.config.schema import Config
from megafusion.durable import fsync_path, publish, write_text

ADAM_STATES = ("master", "exp_avg", "exp_avg_sq")  # what a ZeRO partition holds per parameter


def _layout() -> dict[str, int]:
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "dp": ps.get_data_parallel_world_size(),
    }


def _ranks() -> tuple[int, int, int]:
    return ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank()


def _optimizer_tensors(optimizer, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's ZeRO partition: fp32 master flat groups and the base AdamW state on them.

    The JSON side records, per group, the parameters in flat-buffer order with their
    numels, the partition size and the DP size: what re-cutting the partitions for
    another layout needs (DeepSpeed pads each flat group at its end, then splits it
    evenly over DP).
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"groups": [], "dp": ps.get_data_parallel_world_size()}
    names = {id(p): n for n, p in model.named_parameters()}
    inner = optimizer.optimizer  # the torch AdamW DeepSpeed wraps
    for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
        tensors[f"group{i}.master"] = master.detach().contiguous()
        state = inner.state.get(master, {})
        g: dict[str, Any] = {
            "numel": master.numel(),
            "params": [[names.get(id(p), "?"), p.numel()] for p in flat_group_order(optimizer, i)],
            "weight_decay": optimizer.optimizer.param_groups[i].get("weight_decay", 0.0),
        }
        for key, val in state.items():
            if key == "step":
                g["step"] = float(val)
            elif torch.is_tensor(val):
                tensors[f"group{i}.{key}"] = val.detach().contiguous()
        meta["groups"].append(g)
    return tensors, meta


def flat_group_order(optimizer, i: int) -> list[torch.nn.Parameter]:
    """The parameters of ZeRO flat group ``i`` in buffer order (DeepSpeed may deal them round-robin)."""
    return list(getattr(optimizer, "round_robin_bit16_groups", optimizer.bit16_groups)[i])


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    cfg: Config,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Collective: every rank writes its shards; returns the final folder."""
    save_dir = Path(save_dir)
    name = f"step_{step:08d}"
    final, tmp = save_dir / name, save_dir / (name + ".tmp")
    rank = dist.get_rank()
    tp, pp, dp = _ranks()
    if rank == 0:
        for stale in save_dir.glob("step_*.tmp"):  # leftovers of saves that died
            shutil.rmtree(stale, ignore_errors=True)
        for sub in ("model", "optim", "rng"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    written: list[str] = []
    if dp == 0:
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "model" / f"tp{tp}_pp{pp}.safetensors"))
        written.append(f"model/tp{tp}_pp{pp}.safetensors")
    tensors, ometa = _optimizer_tensors(optimizer, model)
    stem = f"optim/tp{tp}_pp{pp}_dp{dp}"
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / (stem + ".safetensors")))
    write_json(tmp / (stem + ".json"), ometa)
    written += [stem + ".safetensors", stem + ".json"]
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng" / f"rank{rank}.safetensors"))
    written.append(f"rng/rank{rank}.safetensors")
    for rel in written:
        fsync_path(tmp / rel)
    digests = {rel: file_digest(tmp / rel) for rel in written}  # each rank hashes its own files
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digests)
    if rank == 0:
        index = {k: v for part in gathered for k, v in part.items()}
        write_json(tmp / INDEX, index)
        dump_config(cfg, tmp / "config.yaml")
        write_json(
            tmp / "meta.json",
            {"step": step, "layout": _layout(), "time": time.time(), "world_size": dist.get_world_size(), **extra},
        )
        publish(tmp, final)  # fsyncs the folder's files (cheap for the shards already flushed above), renames
        write_text(save_dir / LATEST, name + "\n")
        done = sorted(p for p in save_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            if old != final:  # never the folder `latest` now points to
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Collective: restore trainable weights, this rank's ZeRO partition and RNG; returns meta.json."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    now = _layout()
    if meta["layout"] != {k: now[k] for k in meta["layout"]}:  # weights-only checkpoints carry no DP size
        raise CheckpointError(
            f"{path}: saved with layout {meta['layout']}, this run is {now}; "
            "convert or reshard the checkpoint to this layout first"
        )
    weights_only = bool(meta.get("weights_only", False))
    universal = meta.get("optimizer_format") == "universal"  # written by the resharder, any DP size
    tp, pp, dp = _ranks()
    if not (path / INDEX).is_file():
        raise CheckpointError(f"{path / INDEX} missing: not a complete checkpoint")
    index = json.loads((path / INDEX).read_text())
    stem = f"optim/tp{tp}_pp{pp}" if universal else f"optim/tp{tp}_pp{pp}_dp{dp}"
    needed = [f"model/tp{tp}_pp{pp}.safetensors"]
    if not weights_only:
        needed += [stem + ".safetensors", stem + ".json"]
    if not weights_only and meta.get("rng", True):
        needed.append(f"rng/rank{dist.get_rank()}.safetensors")
    for rel in needed:
        verify_file(path, rel, index)
    model_file = path / "model" / f"tp{tp}_pp{pp}.safetensors"
    saved = load_file(str(model_file))
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != trainable:
        diff = sorted(set(saved) ^ trainable)
        raise CheckpointError(f"{model_file}: trainable parameters differ from the model's, e.g. {diff[:3]}")
    with torch.no_grad():
        for n, t in saved.items():
            if params[n].shape != t.shape:
                raise CheckpointError(f"{model_file}: {n} has shape {tuple(t.shape)}, model {tuple(params[n].shape)}")
            params[n].copy_(t)
    if weights_only:  # a converted checkpoint: fresh optimizer, whose fp32 master must see these weights
        optimizer.refresh_fp32_params()
        return meta
    ometa = json.loads((path / (stem + ".json")).read_text())
    if universal:
        load_universal_partition(optimizer, model, path / (stem + ".safetensors"), ometa)
    else:
        load_zero_partition(optimizer, model, load_file(str(path / (stem + ".safetensors"))), ometa, str(path / stem))
    if not meta.get("rng", True):
        return meta  # resharded: generator states of the old ranks do not map onto the new ones
    rng = load_file(str(path / "rng" / f"rank{dist.get_rank()}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


def load_universal_partition(optimizer, model: torch.nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Cut this rank's ZeRO partition out of per-parameter optimizer state (see checkpoint/reshard.py).

    DeepSpeed's flat group i is its parameters in buffer order, concatenated, zero-padded
    at the end, and split evenly over DP; this rank owns ``[r * P, (r + 1) * P)``. Each
    parameter overlapping that range contributes one flat read per state.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    inner = optimizer.optimizer
    r = ps.get_data_parallel_rank()
    seen: set[str] = set()
    with TensorFile(path) as f:
        for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
            part = master.numel()
            lo, hi = r * part, (r + 1) * part
            bufs = {"master": torch.zeros(part, dtype=torch.float32)}
            off = 0
            for p in flat_group_order(optimizer, i):
                name, n = names[id(p)], p.numel()
                seen.add(name)
                keys = {s: f"{name}/{s}" for s in ADAM_STATES}
                if keys["master"] not in f:
                    raise CheckpointError(f"{path}: no optimizer state for parameter {name} (different model?)")
                if f.numel(keys["master"]) != n:
                    raise CheckpointError(
                        f"{path}: {name} has {f.numel(keys['master'])} elements of optimizer "
                        f"state, the model's shard has {n} (resharded for another layout?)"
                    )
                a, b = max(off, lo), min(off + n, hi)
                if a < b:
                    for s, key in keys.items():
                        if key in f:
                            buf = bufs.setdefault(s, torch.zeros(part, dtype=torch.float32))
                            buf[a - lo : b - lo] = f.read_flat(key, a - off, b - off)
                off += n
            with torch.no_grad():
                master.copy_(bufs.pop("master").to(master.device))
            state: dict[str, Any] = {k: v.to(master.device) for k, v in bufs.items()}
            if meta.get("step") is not None:
                state["step"] = torch.tensor(float(meta["step"]), dtype=torch.float32, device=master.device)
            if state:
                inner.state[master] = state
        extra = sorted({k.rsplit("/", 1)[0] for k in f.keys()} - seen)
        if extra:
            raise CheckpointError(f"{path}: optimizer state for parameters this model does not train, e.g. {extra[:3]}")


def load_zero_partition(
    optimizer, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str
) -> None:
    """Copy a saved ZeRO partition (fp32 master + Adam moments + step) into a live DeepSpeed optimizer."""
    inner = optimizer.optimizer
    groups = optimizer.single_partition_of_fp32_groups
    if len(meta["groups"]) != len(groups):
        raise CheckpointError(f"{where}: {len(meta['groups'])} optimizer groups saved, this run has {len(groups)}")
    names = {id(p): n for n, p in model.named_parameters()}
    for i, master in enumerate(groups):
        order = [[names.get(id(p), "?"), p.numel()] for p in flat_group_order(optimizer, i)]
        if "params" in meta["groups"][i] and meta["groups"][i]["params"] != order:
            raise CheckpointError(
                f"{where}: group {i} holds other parameters (or another order) than this run's "
                "optimizer; reshard the checkpoint for this layout"
            )
        if f"group{i}.master" not in tensors:
            raise CheckpointError(f"{where}: group {i} has no saved fp32 partition")
        saved = tensors[f"group{i}.master"]
        if saved.shape != master.shape:
            raise CheckpointError(
                f"{where}: group {i} ZeRO partition has {saved.numel()} elements, this run expects "
                f"{master.numel()} (different DP size or trainable set; reshard the checkpoint)"
            )
        with torch.no_grad():
            master.copy_(saved.to(master.device))
        state: dict[str, Any] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            if f"group{i}.{key}" in tensors:
                state[key] = tensors[f"group{i}.{key}"].to(master.device).clone()
        if "step" in meta["groups"][i]:  # fused AdamW reads the step on the parameters' device
            state["step"] = torch.tensor(meta["groups"][i]["step"], dtype=torch.float32, device=master.device)
        if state:
            inner.state[master] = state
