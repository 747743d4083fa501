"""Resumable training checkpoints: atomic, sharded per rank, nothing pickled.

Layout of one checkpoint ``<save>/step_00000100/``::

    meta.json                        step, data position, layout, counters (JSON)
    index.json                       every shard's size and checksum (XXH3-128), and its tensors' shapes/dtypes
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

Saving is split so that training need not wait: ``take_snapshot`` copies this rank's part to host
memory (the only part the loop waits for), ``write_snapshot`` writes it, hashing each file as it
is written, and publishes (``training/checkpointing.py`` runs it in a background thread).

Loading verifies each file a rank reads against index.json (size, checksum), a file that several
DP ranks read by one of them only: a truncated or corrupted shard is an error naming the file. What the format
trusts: safetensors files hold raw tensors only and JSON/YAML hold plain data;
loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors.torch import load_file

from megafusion.checkpoint.files import (
    INDEX,
    LATEST,
    CheckpointError,
    verify_files,
    write_json,
)
from megafusion.checkpoint.shard_writer import write_bytes, write_shard
from megafusion.checkpoint.tensor_file import TensorFile
from megafusion.config.loader import dump_config
from megafusion.config.schema import Config
from megafusion.durable import publish, write_text

ADAM_STATES = ("master", "exp_avg", "exp_avg_sq")  # what a ZeRO partition holds per parameter
_FAILED = "__write_failed__"


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


@dataclass
class Snapshot:
    """One rank's part of a checkpoint, copied to host memory: what the writer needs, nothing live.

    Taking it is the only part of a save the training loop waits for (device-to-host copies of
    the trainable weights and this rank's ZeRO partition); the optimizer may step as soon as it
    exists, since every tensor here is a copy.
    """

    step: int
    name: str
    files: dict[str, dict[str, torch.Tensor] | bytes]  # rel path -> tensors (safetensors) or bytes (JSON)
    meta: dict[str, Any]  # meta.json (rank 0 writes it)
    cfg: Config
    nbytes: int
    seconds: float  # how long taking the snapshot blocked the loop


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that later in-place updates cannot touch (pinned + async on CUDA)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone().contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def take_snapshot(
    step: int, model: torch.nn.Module, optimizer, cfg: Config, extra: dict[str, Any], extra_files=None
) -> Snapshot:
    """This rank's files of checkpoint ``step`` as host copies; collective-free.

    ``extra_files`` (rel path -> bytes) are written beside the shards by this rank (e.g. its
    data loader position).
    """
    t0 = time.perf_counter()
    rank = dist.get_rank()
    tp, pp, dp = _ranks()
    files: dict[str, dict[str, torch.Tensor] | bytes] = {}
    if dp == 0:
        files[f"model/tp{tp}_pp{pp}.safetensors"] = {
            n: _host_copy(p) for n, p in model.named_parameters() if p.requires_grad
        }
    tensors, ometa = _optimizer_tensors(optimizer, model)
    stem = f"optim/tp{tp}_pp{pp}_dp{dp}"
    files[stem + ".safetensors"] = {k: _host_copy(v) for k, v in tensors.items()}
    files[stem + ".json"] = json.dumps(ometa, indent=1, sort_keys=True).encode()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    files[f"rng/rank{rank}.safetensors"] = rng
    files.update(extra_files or {})
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the pinned copies are complete before the writer reads them
    nbytes = sum(
        sum(t.numel() * t.element_size() for t in f.values()) if isinstance(f, dict) else len(f) for f in files.values()
    )
    meta = {"step": step, "layout": _layout(), "time": time.time(), "world_size": dist.get_world_size(), **extra}
    return Snapshot(step, f"step_{step:08d}", files, meta, cfg, nbytes, time.perf_counter() - t0)


def write_snapshot(snap: Snapshot, save_dir: str | Path, keep: int = 2, group=None) -> tuple[Path, float]:
    """Collective over ``group``: write this rank's files, then rank 0 publishes the folder and moves ``latest``.

    Each file is hashed as it is written and fsynced (no re-read). Rank 0 renames
    ``step_X.tmp`` -> ``step_X`` only after every rank's entries have arrived, i.e. every
    file of the checkpoint is complete and on disk; only then does ``latest`` move and an old
    checkpoint go. A process killed anywhere in here leaves the previous ``latest`` intact.
    Returns (final folder, seconds this rank spent writing).
    """
    t0 = time.perf_counter()
    save_dir = Path(save_dir)
    tmp, final = save_dir / (snap.name + ".tmp"), save_dir / snap.name
    entries: dict[str, Any] = {}
    try:
        for i, (rel, content) in enumerate(snap.files.items()):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, dict):
                entries[rel] = write_shard(tmp / rel, content)
            else:
                entries[rel] = write_bytes(tmp / rel, content)
            if i == 0:
                _fault_stall(snap.step)
    except OSError as exc:  # told to every rank below, so none waits for this one's files
        entries = {_FAILED: f"rank {dist.get_rank()}: {exc}"}
    seconds = time.perf_counter() - t0
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, entries, group=group)
    failed = [part[_FAILED] for part in gathered if _FAILED in part]
    if failed:
        raise CheckpointError(f"save of {final} failed, `latest` unchanged: " + "; ".join(failed))
    if dist.get_rank() == 0:
        index = {k: v for part in gathered for k, v in part.items()}
        write_json(tmp / INDEX, index)
        dump_config(snap.cfg, tmp / "config.yaml")
        write_json(tmp / "meta.json", snap.meta)
        publish(tmp, final)  # fsyncs the folder's files (cheap for the shards already flushed above), renames
        write_text(save_dir / LATEST, snap.name + "\n")
        done = sorted(p for p in save_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            if old != final:  # never the folder `latest` now points to
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)
    return final, seconds


def _fault_stall(step: int) -> None:
    """Fault injection for tests: ``MEGAFUSION_FAULT_SAVE_STALL=STEP:SECONDS`` stalls the writer of checkpoint
    STEP after its first file, so a test can kill a process while a save is half written."""
    spec = os.environ.get("MEGAFUSION_FAULT_SAVE_STALL", "")
    if spec and int(spec.split(":")[0]) == step:
        time.sleep(float(spec.split(":")[1]))


def remove_stale_saves(save_dir: str | Path) -> None:
    """Rank 0: delete ``step_*.tmp`` folders of saves that died (none may be in flight when called)."""
    for stale in Path(save_dir).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def verify_shared(path: Path, needed: list[str], index: dict[str, Any], shared: list[str]) -> None:
    """Collective: verify the files this rank reads, each shared file by one rank of those that read it.

    Every DP rank of a (TP, PP) position reads the same model shard (and, for a universal
    checkpoint, the same optimizer file); one of them checks it (the i-th shared file by DP rank
    i mod DP) instead of all of them hashing all of it. The outcome is exchanged, so every rank
    raises the same error, naming the file, instead of some ranks hanging in the next collective.
    """
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = [rel for rel in needed if rel not in shared] + [rel for i, rel in enumerate(shared) if i % dp == dp_rank]
    error = None
    try:
        verify_files(path, mine, index)
    except CheckpointError as exc:
        error = str(exc)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = [e for e in errors if e]
    if bad:
        raise CheckpointError(bad[0] + (f" (and {len(bad) - 1} more on other ranks)" if len(bad) > 1 else ""))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer, weights_only: bool = False) -> dict[str, Any]:
    """Collective: restore trainable weights, this rank's ZeRO partition and RNG; returns meta.json.

    ``weights_only``: the trainable weights alone (a fine-tune from a trained run): the optimizer
    starts fresh from them, the RNG is left as it is, and the optimizer files are not read.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    now = _layout()
    # weights-only checkpoints carry no DP size, and the weights of a trained one fit any DP size
    keys = [k for k in meta["layout"] if not (weights_only and k == "dp")]
    if {k: meta["layout"][k] for k in keys} != {k: now[k] for k in keys}:
        raise CheckpointError(
            f"{path}: saved with layout {meta['layout']}, this run is {now}; "
            "convert or reshard the checkpoint to this layout first"
        )
    weights_only = weights_only or bool(meta.get("weights_only", False))
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
    verify_shared(path, needed, index, shared=[needed[0]] + ([stem + ".safetensors"] if universal else []))
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
