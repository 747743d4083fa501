"""Re-cut a megafusion checkpoint for another TP x PP (x VPP) layout, optimizer state included.

Input: any checkpoint the trainer (``training_state.write_snapshot``) or ``convert_hf_llama`` wrote (or an
earlier reshard). Output, for every new (tp, pp) shard:

    model/tp{t}_pp{p}.safetensors   the trainable weights, cut for the new layout
    optim/tp{t}_pp{p}.safetensors   per-parameter fp32 master + Adam moments, flattened
    optim/tp{t}_pp{p}.json          {"format": "universal", "step": ...}

The optimizer state is written *per parameter* ("universal", as DeepSpeed's
universal checkpoints do), not per ZeRO partition: a ZeRO partition is a range
of a flat buffer whose order and padding belong to the live DeepSpeed optimizer.
``load_checkpoint`` cuts each rank's range out of these files for whatever DP
size the resumed run has, from the live optimizer's own parameter order, so the
DP size is not fixed here (``dp`` only validates the batch arithmetic).

Nothing passes through this process's memory but small index tensors: each output
tensor is planned as byte runs of the input files (``CheckpointSource.runs``: block ids put
through the same ``gather.unshard``/``gather.shard`` as real tensors), copied
file-to-file with ``os.copy_file_range``, or, for tensors made of many short runs, read
once per source region and gathered. Input ZeRO partitions are addressed as flat ranges
(the JSON beside each lists its parameters in flat order), so a parameter spanning two
partitions is two runs. Input files are checksummed against the input ``index.json`` in
background threads while the copy runs (sizes at once); the output is checksummed from
the finished files, gets its own index and is published by a rename only after every
input has passed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from megafusion.checkpoint.files import INDEX, CheckpointError, file_digest, verify_file
from megafusion.checkpoint.gather import REPLICA
from megafusion.checkpoint.shapes import index_shape_problems
from megafusion.checkpoint.source import UNIVERSAL, CheckpointSource
from megafusion.checkpoint.tensor_file import write_tensor_file
from megafusion.checkpoint.training_state import ADAM_STATES
from megafusion.config.loader import dump_config
from megafusion.config.schema import Config
from megafusion.config.validate import split_problems
from megafusion.durable import fsync_path, publish
from megafusion.parallel.layout import Layout


def _placement(canon: str, m, layout: Layout) -> list[tuple[int, int]]:
    """(pp_rank, chunk) pairs that hold canonical parameter ``canon`` in ``layout``.

    Canonical names are the single-stage model's (``layers.7.qkv.image.weight``); in a
    checkpoint the key is ``f"{chunk}.core.{canonical}"``. Layers follow megatron-core's
    interleaved order (``parallel.layout.layer_ids_for_chunk``).
    """
    head = canon.split(".")[0]
    if head == "layers":
        i = int(canon.split(".")[1])
        per = m.num_layers // (layout.pp * layout.vpp)
        chunk, rest = divmod(i, m.num_layers // layout.vpp)
        return [(rest // per, chunk)]
    if head in ("special_embedding", "image_in"):
        return [(0, 0)]
    if head == "image_out":
        return [(layout.pp - 1, layout.vpp - 1)]
    raise CheckpointError(f"parameter {canon!r}: unknown where it lives in a pipeline (not a layer, U-Net or <BOI>)")


def _write_file(path: Path, entries, sources: list[Path]) -> dict[str, Any]:
    """One output file: bytes copied from the runs, flushed to disk, then checksummed (from the page cache)."""
    write_tensor_file(path, entries, sources)
    fsync_path(path)
    return file_digest(path)


def _check_layout(cfg: Config, new: Layout, dp: int | None, where: Path) -> None:
    problems = [sp.short() for sp in split_problems(cfg.model, new.tp, new.pp, new.vpp)]
    if dp is not None:
        d = cfg.data
        if dp < 1 or d.global_batch_size % (d.micro_batch_size * dp):
            problems.append(
                f"data.global_batch_size {d.global_batch_size} not divisible by "
                f"data.micro_batch_size {d.micro_batch_size} x DP {dp}"
            )
    if problems:
        raise CheckpointError(
            f"{where}: cannot reshard to {new.model_parallel}"
            + (f" DP={dp}" if dp else "")
            + ": "
            + "; ".join(problems)
        )


def reshard_checkpoint(
    in_dir: str | Path,
    out_dir: str | Path,
    tp: int,
    pp: int,
    vpp: int | None = None,
    dp: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``out_dir`` (atomically) holding ``in_dir`` at the new layout; returns it."""
    from tqdm import tqdm

    src_dir, out = Path(in_dir), Path(out_dir)
    if src_dir.resolve() == out.resolve():
        raise CheckpointError(f"--out {out} is the input checkpoint; write to a new directory")
    new = Layout(tp, pp, vpp=vpp or 1)
    t0 = time.time()
    src = CheckpointSource(src_dir)
    cfg, m = src.cfg, src.cfg.model
    where: dict[tuple[int, int], list[str]] = defaultdict(list)  # canonical names of each new (pp, chunk)
    try:
        if m.architecture != "llamafusion":  # its vocab-parallel text tensors train: their padding is per layout
            raise CheckpointError(f"{src_dir}: resharding a {m.architecture} checkpoint is not supported")
        bad = index_shape_problems(m, src.index, src.layout.tp)
        if bad:
            raise CheckpointError(f"{src_dir}: its config.yaml does not describe its weights: " + "; ".join(bad))
        _check_layout(cfg, new, dp, src_dir)
        unknown = [c for c in src.model if c not in src.optim] if not src.weights_only else []
        if unknown and src.step is not None:
            raise CheckpointError(f"{src_dir}: trainable parameters without optimizer state, e.g. {unknown[:3]}")
        for canon in sorted(src.model):
            for spot in _placement(canon, m, new):
                where[spot].append(canon)
    except BaseException:
        src.close()
        raise
    unet_in = [c for c in sorted(src.model) if c.startswith("image_in.")]

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "model").mkdir(parents=True)
    if not src.weights_only:
        (tmp / "optim").mkdir()
    index: dict[str, Any] = {}
    writes: dict[str, Any] = {}
    writers = ThreadPoolExecutor(max_workers=2)
    bar = tqdm(total=new.tp * new.pp, desc="resharding", unit="shard", disable=not progress)
    moved = 0
    try:
        for p in range(new.pp):
            for t in range(new.tp):
                stem = f"tp{t}_pp{p}"
                weights, states = [], []  # (key, dtype, shape, addresses of its elements)
                for chunk in range(new.vpp):
                    for canon in where[(p, chunk)]:
                        dtype, shape = src.dtype(canon), src.local_shape(canon, new.tp, t)
                        weights.append(
                            (f"{chunk}.core.{canon}", dtype, shape, lambda c=canon, t=t: src.runs(c, new.tp, t))
                        )
                        for s in ADAM_STATES if not src.weights_only else ():
                            if src.has_state(canon, s):
                                states.append(
                                    (
                                        f"{chunk}.core.{canon}/{s}",
                                        torch.float32,
                                        (math.prod(shape),),
                                        lambda c=canon, s=s, t=t: src.runs(c, new.tp, t, s),
                                    )
                                )
                    last_not_first = (p, chunk) == (new.pp - 1, new.vpp - 1) and (p, chunk) != (0, 0)
                    if last_not_first and unet_in and cfg.model.image.io == "unet":
                        for canon in unet_in:  # the last stage's tied down-sampler replica
                            weights.append(
                                (
                                    f"{chunk}.{REPLICA}.{canon[len('image_in.') :]}",
                                    src.dtype(canon),
                                    src.local_shape(canon, 1, 0),
                                    lambda c=canon: src.runs(c, 1, 0),
                                )
                            )
                files = [(f"model/{stem}.safetensors", weights)]
                if not src.weights_only:
                    files.append((f"optim/{stem}.safetensors", states))
                    (tmp / f"optim/{stem}.json").write_text(json.dumps({"format": UNIVERSAL, "step": src.step}))
                    index[f"optim/{stem}.json"] = file_digest(tmp / f"optim/{stem}.json")
                for rel, entries in files:  # written two at a time: planning in one overlaps I/O in the other
                    writes[rel] = writers.submit(_write_file, tmp / rel, entries, src.sources)
                bar.update(1)
        for rel, fut in writes.items():
            index[rel] = fut.result()
            moved += index[rel]["bytes"]
        for rel in sorted(r for r in src.index if r.startswith("data/")):  # loader positions: layout-free JSON
            verify_file(src_dir, rel, src.index)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src_dir / rel, tmp / rel)
            index[rel] = file_digest(tmp / rel)
        src.wait_verified()
    except BaseException:
        try:
            src.wait_verified()  # a corrupted input explains a failure best
        finally:
            writers.shutdown(wait=True, cancel_futures=True)
            src.close()
            bar.close()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    writers.shutdown(wait=True)
    src.close()
    bar.close()

    layout: dict[str, int] = {"tp": new.tp, "pp": new.pp, "vpp": new.vpp}
    if dp is not None:
        layout["dp"] = dp
    meta = {k: v for k, v in src.meta.items() if k not in ("layout", "world_size")}
    meta.update(
        {"layout": layout, "resharded_from": src.meta["layout"], "rng": False, "seconds": round(time.time() - t0, 2)}
    )
    if not src.weights_only:
        meta["optimizer_format"] = UNIVERSAL
    par = replace(
        cfg.parallel,
        tensor_parallel=new.tp,
        pipeline_parallel=new.pp,
        virtual_pipeline_stages=vpp if new.vpp > 1 else None,
        data_parallel=dp if dp else -1,
    )
    dump_config(replace(cfg, parallel=par), tmp / "config.yaml")
    (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    publish(tmp, out)
    log(
        f"[reshard] {src_dir} ({src.layout.model_parallel}) -> {out} ({new.model_parallel}): "
        f"{moved / 2**20:.1f} MiB in "
        f"{time.time() - t0:.1f} s"
    )
    return out
