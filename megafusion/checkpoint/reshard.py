"""Re-cut a megafusion checkpoint for another TP x PP (x VPP) layout, optimizer state included.

Input: any checkpoint ``save_checkpoint`` or ``convert_hf_llama`` wrote (or an
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
tensor is planned as byte runs of the input files (``_Source.runs``: block ids put
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
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from megafusion.checkpoint.files import INDEX, CheckpointError, file_digest, read_checkpoint_files, verify_file
from megafusion.checkpoint.gather import REPLICA, canonical_name, shard, shard_kind, unshard
from megafusion.checkpoint.shapes import index_shape_problems
from megafusion.checkpoint.tensor_file import DTYPES, TensorFile, merge_runs, write_tensor_file
from megafusion.checkpoint.training_state import ADAM_STATES
from megafusion.config.loader import dump_config
from megafusion.config.schema import Config
from megafusion.config.validate import split_problems
from megafusion.durable import publish
from megafusion.parallel.layout import Layout

UNIVERSAL = "universal"


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


class _Source:
    """The input checkpoint: where each canonical tensor's TP shards and optimizer ranges live."""

    def __init__(self, root: Path):
        self.root = root
        self.meta, self.index, self.cfg = read_checkpoint_files(root)
        lay = self.meta["layout"]
        self.layout = Layout(lay["tp"], lay["pp"], vpp=lay.get("vpp", 1))
        self.weights_only = bool(self.meta.get("weights_only", False))
        self.universal = self.meta.get("optimizer_format") == UNIVERSAL
        # every input file is checksummed in the background while the copy runs; the output is
        # published only after all of them have passed (wait_verified)
        wanted = [
            rel
            for rel in sorted(self.index)
            if rel.startswith("model/") or (rel.startswith("optim/") and not self.weights_only)
        ]
        for rel in wanted:  # cheap checks first: a missing or truncated file fails before any copying
            if not (root / rel).is_file() or (root / rel).stat().st_size != self.index[rel]["bytes"]:
                verify_file(root, rel, self.index)
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))  # hashing releases the GIL
        self._verified = [self._pool.submit(verify_file, root, rel, self.index) for rel in wanted]
        # canonical name -> {tp_rank: (file, key)}; shapes come from the index
        self.model: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)
        self.shapes: dict[tuple[str, int], tuple[int, ...]] = {}
        for t in range(self.layout.tp):
            for p in range(self.layout.pp):
                rel = f"model/tp{t}_pp{p}.safetensors"
                if rel not in self.index:
                    raise CheckpointError(
                        f"{root / rel}: missing for layout {self.layout.model_parallel} (not in {INDEX})"
                    )
                for key, info in self.index[rel]["tensors"].items():
                    canon = canonical_name(key)
                    if canon is None:
                        continue  # tied replica of image_in: rebuilt from image_in
                    self.model[canon][t] = (rel, key)
                    self.shapes[(canon, t)] = tuple(info["shape"])
        self.step: float | None = None
        # canonical name -> {tp_rank: [(file, tensor key, start, stop)]} per state, for flat ZeRO partitions
        self.optim: dict[str, dict[int, dict[str, list[tuple[str, str, int, int]]]]] = defaultdict(dict)
        if not self.weights_only:
            self._index_optimizer()
        self.sources: list[Path] = []  # file index -> path, as addresses encode it
        self._fids: dict[str, int] = {}
        self._offsets: dict[tuple[str, str], int] = {}

    def _index_optimizer(self) -> None:
        steps = set()
        for t in range(self.layout.tp):
            for p in range(self.layout.pp):
                if self.universal:
                    rel = f"optim/tp{t}_pp{p}.safetensors"
                    ometa = json.loads((self.root / f"optim/tp{t}_pp{p}.json").read_text())
                    steps.add(float(ometa["step"]))
                    for key, info in self.index[rel]["tensors"].items():
                        pname, state = key.rsplit("/", 1)
                        numel = int(torch.Size(info["shape"]).numel())
                        canon = canonical_name(pname)
                        self.optim[canon].setdefault(t, {})[state] = [(rel, key, 0, numel)]
                    continue
                j0 = self.root / f"optim/tp{t}_pp{p}_dp0.json"
                if not j0.is_file():
                    raise CheckpointError(f"{j0}: missing; cannot read the optimizer state of TP={t} PP={p}")
                ometa = json.loads(j0.read_text())
                dp = int(ometa["dp"])
                for g, group in enumerate(ometa["groups"]):
                    part = int(group["numel"])
                    if "step" in group:
                        steps.add(float(group["step"]))
                    states = [
                        s
                        for s in ADAM_STATES
                        if s == "master"
                        or f"group{g}.{s}" in self.index[f"optim/tp{t}_pp{p}_dp0.safetensors"]["tensors"]
                    ]
                    off = 0
                    for pname, numel in group["params"]:
                        canon = canonical_name(pname)
                        if canon is None:
                            raise CheckpointError(f"{j0}: optimizer parameter {pname!r} is not a model parameter")
                        per_state: dict[str, list[tuple[str, str, int, int]]] = {s: [] for s in states}
                        for d in range(off // part, min(dp, (off + numel + part - 1) // part)):
                            a, b = max(off, d * part), min(off + numel, (d + 1) * part)
                            if a < b:
                                for s in states:
                                    per_state[s].append(
                                        (
                                            f"optim/tp{t}_pp{p}_dp{d}.safetensors",
                                            f"group{g}.{s}",
                                            a - d * part,
                                            b - d * part,
                                        )
                                    )
                        self.optim[canon][t] = per_state
                        off += numel
                    if off > part * dp:
                        raise CheckpointError(
                            f"{j0}: group {g} lists {off} elements, its {dp} partitions hold {part * dp}"
                        )
        if len(steps) > 1:
            raise CheckpointError(f"{self.root}: optimizer groups disagree on the step count: {sorted(steps)}")
        self.step = steps.pop() if steps else None

    def wait_verified(self) -> None:
        """Raise the first checksum failure of an input file, if any."""
        for fut in self._verified:
            fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _fid(self, rel: str) -> int:
        if rel not in self._fids:
            self._fids[rel] = len(self.sources)
            self.sources.append(self.root / rel)
        return self._fids[rel]

    def _offset(self, rel: str, key: str) -> int:
        if (rel, key) not in self._offsets:
            with TensorFile(self.root / rel) as f:
                for k in f.keys():
                    self._offsets[(rel, k)] = f.data_offset(k)
        return self._offsets[(rel, key)]

    def dtype(self, canon: str) -> torch.dtype:
        rel, key = self.model[canon][0]
        return DTYPES[self.index[rel]["tensors"][key]["dtype"]]

    def local_shape(self, canon: str, tp: int, rank: int) -> tuple[int, ...]:
        """Shape of ``canon``'s shard at TP size ``tp`` (computed on meta tensors, nothing read)."""
        by_rank = self.model[canon]
        metas = [torch.empty(self.shapes[(canon, r)], device="meta") for r in sorted(by_rank)]
        return tuple(shard(canon, unshard(canon, metas, self.cfg.model), self.cfg.model, tp, rank).shape)

    def has_state(self, canon: str, state: str) -> bool:
        return state in self.optim.get(canon, {}).get(0, {})

    def _pieces(self, canon: str, t: int, state: str | None) -> tuple[list[tuple[int, int, int, int]], int]:
        """Where input rank t's shard of ``canon`` (or of its optimizer ``state``) lies, in its flat order.

        Returns ([(file index, byte offset, first element, end element)], itemsize): one piece
        for a weight, one per ZeRO partition the parameter spans for an optimizer state.
        """
        if state is None:
            rel, key = self.model[canon][t]
            n = math.prod(self.shapes[(canon, t)])
            itemsize = torch.empty((), dtype=self.dtype(canon)).element_size()
            return [(self._fid(rel), self._offset(rel, key), 0, n)], itemsize
        pieces, at = [], 0
        for rel, key, a, b in self.optim[canon][t][state]:
            pieces.append((self._fid(rel), self._offset(rel, key) + 4 * a, at, at + b - a))
            at += b - a
        return pieces, 4

    def runs(self, canon: str, tp: int, rank: int, state: str | None = None) -> list[tuple[int, int, int]]:
        """Source byte runs, in order, of rank ``rank``'s shard at TP size ``tp`` (weight or optimizer state).

        The re-cut is computed on *unit ids* instead of values: every input shard becomes a
        small int64 tensor whose entries name blocks of ``u`` contiguous elements (a whole
        row, or the largest column block that both the old and the new TP cut keep whole),
        and goes through the same ``unshard``/``shard`` as real tensors. The blocks of the
        result, mapped to where they lie in the input files, are the runs.
        """
        cfg = self.cfg.model
        ranks = sorted(self.model[canon])
        kind = shard_kind(canon)
        shapes = [self.shapes[(canon, t)] for t in ranks]
        if kind == "replicated":
            pieces, itemsize = self._pieces(canon, ranks[0], state)
            return merge_runs([(f, off, (e - s_) * itemsize) for f, off, s_, e in pieces])
        cols = shapes[0][1]
        u = math.gcd(cols, cols * len(ranks) // tp) if kind == "row" else cols
        units = []
        for t, shp in zip(ranks, shapes):
            n = shp[0] * shp[1] // u
            units.append((t * 2**40 + torch.arange(n, dtype=torch.int64)).view(shp[0], shp[1] // u))
        order = shard(canon, unshard(canon, units, cfg), cfg, tp, rank).reshape(-1)
        runs: list[tuple[int, int, int]] = []
        # consecutive blocks from the same input rank form one stretch of its flat order
        src_rank, idx = order // 2**40, order % 2**40
        cut = torch.nonzero((src_rank[1:] != src_rank[:-1]) | (idx[1:] != idx[:-1] + 1)).squeeze(1) + 1
        starts = [0, *cut.tolist()]
        ends = [*starts[1:], order.numel()]
        table = {t: self._pieces(canon, t, state) for t in ranks}
        last = [e - 1 for e in ends]
        for t, i0, i1 in zip(src_rank[starts].tolist(), idx[starts].tolist(), idx[last].tolist()):
            lo, hi = i0 * u, (i1 + 1) * u  # elements [lo, hi) of rank t's flat shard
            pieces, itemsize = table[t]
            for f, off, s_, e in pieces:  # usually one piece; more where ZeRO partitions split it
                x, y = max(lo, s_), min(hi, e)
                if x < y:
                    runs.append((f, off + (x - s_) * itemsize, (y - x) * itemsize))
        return merge_runs(runs)


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
    src = _Source(src_dir)
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
    hashes: dict[str, Any] = {}
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
                for rel, entries in files:
                    index[rel] = write_tensor_file(tmp / rel, entries, src.sources)
                    moved += index[rel]["bytes"]
                    hashes[rel] = src._pool.submit(file_digest, tmp / rel)  # checksum of the finished file
                bar.update(1)
        src.wait_verified()
    except BaseException:
        try:
            src.wait_verified()  # a corrupted input explains a failure best
        finally:
            src.close()
            bar.close()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for rel, fut in hashes.items():
        index[rel] = fut.result()
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
