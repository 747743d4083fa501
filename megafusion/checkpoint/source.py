"""A checkpoint folder as a source of tensors: any parameter's TP shard at any TP size, as byte runs.

Resharding, export and inference loading all need "rank r's shard of parameter p at TP size t"
from a checkpoint saved at another layout, without assembling the full model. This module
answers it as *byte runs* of the input files (``CheckpointSource.runs``), computed from the
index alone; the resharder copies them file to file, export copies the TP=1 runs of every
parameter into one file, and inference reads only its own runs (``read_local``). Nothing here
unpickles: shapes come from ``index.json``, bytes from safetensors files read with plain reads.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megafusion.checkpoint.files import INDEX, CheckpointError, read_checkpoint_files, verify_file, verify_files
from megafusion.checkpoint.gather import canonical_name, shard, shard_kind, unshard
from megafusion.checkpoint.tensor_file import DTYPES, TensorFile, TensorFileError, merge_runs
from megafusion.checkpoint.training_state import ADAM_STATES
from megafusion.parallel.layout import Layout

UNIVERSAL = "universal"


class CheckpointSource:
    """The input checkpoint: where each canonical tensor's TP shards and optimizer ranges live."""

    def __init__(self, root: Path, verify: bool = True, with_optimizer: bool = True):
        """``verify``: checksum every input file in background threads (``wait_verified`` raises the first
        failure); without it the caller verifies what it reads (``files_read``). ``with_optimizer``:
        index the optimizer state too (resharding), not only the weights (export, inference)."""
        self.root = root
        self.meta, self.index, self.cfg = read_checkpoint_files(root)
        lay = self.meta["layout"]
        self.layout = Layout(lay["tp"], lay["pp"], vpp=lay.get("vpp", 1))
        self.weights_only = bool(self.meta.get("weights_only", False))
        self.universal = self.meta.get("optimizer_format") == UNIVERSAL
        # every input file is checksummed in the background while the copy runs; the output is
        # published only after all of them have passed (wait_verified)
        with_optimizer = with_optimizer and not self.weights_only
        wanted = [
            rel
            for rel in sorted(self.index)
            if rel.startswith("model/") or (rel.startswith("optim/") and with_optimizer)
        ]
        for rel in wanted:  # cheap checks first: a missing or truncated file fails before any copying
            if not (root / rel).is_file() or (root / rel).stat().st_size != self.index[rel]["bytes"]:
                verify_file(root, rel, self.index)
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))  # hashing releases the GIL
        self._verified = [self._pool.submit(verify_file, root, rel, self.index) for rel in wanted] if verify else []
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
        if with_optimizer:
            self._index_optimizer()
        self.sources: list[Path] = []  # file index -> path, as addresses encode it
        self._fds: dict[int, int] = {}
        self._fids: dict[str, int] = {}
        self._lock = threading.Lock()
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
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, fid: int) -> int:
        """An open read-only descriptor of source file ``fid`` (kept until ``close``)."""
        if fid not in self._fds:
            self._fds[fid] = os.open(self.sources[fid], os.O_RDONLY)
        return self._fds[fid]

    def _fid(self, rel: str) -> int:
        with self._lock:  # planners in several writer threads share the file table
            return self._fid_unlocked(rel)

    def _fid_unlocked(self, rel: str) -> int:
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


def read_runs(src: CheckpointSource, runs: list[tuple[int, int, int]], dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor made of ``runs`` (source file index, byte offset, length), read with one pread each."""
    nbytes = sum(n for _, _, n in runs)
    buf = bytearray(nbytes)
    view, at = memoryview(buf), 0
    for fid, off, n in runs:
        fd = src.fd(fid)
        got = os.preadv(fd, [view[at : at + n]], off)
        if got != n:
            raise TensorFileError(f"{src.sources[fid]}: ends before byte {off + n} (truncated?)")
        at += n
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)


def read_local(src: CheckpointSource, canon: str, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of trained parameter ``canon`` at TP size ``tp``: only its bytes are read."""
    return read_runs(src, src.runs(canon, tp, rank), src.dtype(canon), src.local_shape(canon, tp, rank))


def verify_read(src: CheckpointSource) -> None:
    """Verify (checksums, in parallel) exactly the files ``read_runs`` has read so far."""
    verify_files(src.root, sorted(str(p.relative_to(src.root)) for p in src.sources), src.index)
