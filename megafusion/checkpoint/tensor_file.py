"""Read tensors, or element ranges of them, from a safetensors file with plain reads.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a
resharder touches then counts towards its resident memory until the file is
closed. Resharding a 70B checkpoint on a small node needs the opposite: read one
tensor (or one flat range of it, for ZeRO partitions) into a buffer we own,
use it, drop it. The format is simple enough to read directly: an 8-byte
little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}``, then the raw bytes. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorFileError(ValueError):
    """A safetensors file is malformed or lacks a tensor; the message names the file."""


class TensorFile:
    """One safetensors file, opened for reading; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        raw = self._f.read(8)
        if len(raw) != 8:
            raise TensorFileError(f"{self.path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        size = self.path.stat().st_size
        if n > size - 8:
            raise TensorFileError(f"{self.path}: header length {n} exceeds the file size {size} (truncated?)")
        try:
            header: dict[str, Any] = json.loads(self._f.read(n))
        except ValueError as exc:
            raise TensorFileError(f"{self.path}: unreadable safetensors header ({exc})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            if e["dtype"] not in DTYPES:
                raise TensorFileError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
            if self._data_start + e["data_offsets"][1] > size:
                raise TensorFileError(f"{self.path}: tensor {name} runs past the end of the file (truncated)")

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self.entries[name]
        except KeyError:
            raise TensorFileError(f"{self.path}: no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def data_offset(self, name: str) -> int:
        """Byte offset of the tensor's first element in the file."""
        return self._data_start + self._entry(name)["data_offsets"][0]

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, as a new 1-D tensor."""
        e = self._entry(name)
        dtype = DTYPES[e["dtype"]]
        numel = math.prod(e["shape"])
        if not 0 <= start <= stop <= numel:
            raise TensorFileError(f"{self.path}: range [{start}, {stop}) outside {name} of {numel} elements")
        itemsize = torch.empty((), dtype=dtype).element_size()
        out = torch.empty(stop - start, dtype=dtype)
        if stop == start:
            return out
        self._f.seek(self._data_start + e["data_offsets"][0] + start * itemsize)
        buf = out.view(torch.uint8).numpy()
        got = self._f.readinto(memoryview(buf))
        if got != buf.nbytes:
            raise TensorFileError(f"{self.path}: short read of {name} ({got} of {buf.nbytes} bytes; truncated?)")
        return out

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (along its first dimension): one contiguous read."""
        shape = self.shape(name)
        inner = math.prod(shape[1:])
        return self.read_flat(name, start * inner, stop * inner).view(stop - start, *shape[1:])

    def read_cols(self, name: str, start: int, stop: int, chunk_bytes: int = 64 << 20) -> torch.Tensor:
        """Columns ``[start, stop)`` of a 2-D tensor, reading whole rows ~``chunk_bytes`` at a time.

        Memory stays at the result plus one chunk, whatever the tensor's size (a row-parallel
        TP shard of an 8B FFN weight is 1/TP of it, the rest is never held).
        """
        rows, cols = self.shape(name)
        itemsize = DTYPES[self._entry(name)["dtype"]].itemsize
        step = max(1, chunk_bytes // max(1, cols * itemsize))
        out = torch.empty(rows, stop - start, dtype=DTYPES[self._entry(name)["dtype"]])
        for a in range(0, rows, step):
            b = min(rows, a + step)
            out[a:b] = self.read_rows(name, a, b)[:, start:stop]
        return out


NAMES = {v: k for k, v in DTYPES.items()}


Run = tuple[int, int, int]  # (source file index, byte offset, byte length)


def merge_runs(runs: list[Run]) -> list[Run]:
    """Join runs that continue each other in the same source file."""
    out: list[list[int]] = []
    for fid, off, n in runs:
        if out and out[-1][0] == fid and out[-1][1] + out[-1][2] == off:
            out[-1][2] += n
        else:
            out.append([fid, off, n])
    return [(a, b, c) for a, b, c in out]


def write_tensor_file(
    path: str | Path,
    entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], list[Run]]]],
    sources: list[Path],
    threads: int = 4,
) -> dict[str, Any]:
    """Write a safetensors file whose tensors are re-arranged bytes of other safetensors files.

    ``entries`` are ``(name, dtype, shape, runs)``: ``runs()`` lists, in the output
    tensor's byte order, the source byte ranges it is made of. Long contiguous runs are
    copied file-to-file with ``os.copy_file_range``, inside the kernel, without passing through this
    process (a pread/pwrite loop where the kernel refuses); a tensor made of many short runs (rows
    interleaved by a row-parallel re-cut) is gathered from one read per source region instead. Returns the index entry
    without the checksum, which the caller computes from the finished file.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(raw)) + raw
    fds: dict[int, int] = {}
    lock = threading.Lock()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def source_fd(fid: int) -> int:
        with lock:
            if fid not in fds:
                fds[fid] = os.open(sources[fid], os.O_RDONLY)
            return fds[fid]

    def write_entry(name: str, make: Callable[[], list[Run]]) -> None:
        at = len(head) + header[name]["data_offsets"][0]
        nbytes = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        runs = make()
        if sum(r[2] for r in runs) != nbytes:
            raise ValueError(f"{path}: {name} planned {nbytes} bytes, its runs cover {sum(r[2] for r in runs)}")
        if len(runs) <= max(8, nbytes >> 16):  # runs of 64 KiB on average or more
            for fid, src_off, length in runs:
                _copy_range(source_fd(fid), src_off, fd, at, length, sources[fid])
                at += length
        else:  # many short runs (a row-parallel re-cut): one read per source region, gather, one write
            view = memoryview(_gather(runs, nbytes, {f: source_fd(f) for f in {r[0] for r in runs}}, sources))
            while len(view):
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n

    try:
        os.ftruncate(fd, len(head) + offset)
        os.pwrite(fd, head, 0)
        # tensors land at fixed offsets, so several are written at once (the copies release the GIL)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for fut in [pool.submit(write_entry, name, make) for name, _, _, make in entries]:
                fut.result()
    finally:
        os.close(fd)
        for f in fds.values():
            os.close(f)
    return {
        "bytes": len(head) + offset,
        "tensors": {name: {"shape": list(shape), "dtype": NAMES[dtype]} for name, dtype, shape, _ in entries},
    }


def _gather(runs: list[Run], nbytes: int, fds: dict[int, int], sources: list[Path]) -> bytearray:
    """The bytes of ``runs`` in order, reading each source file's covering range once."""
    regions: dict[int, tuple[int, memoryview]] = {}
    for f in {r[0] for r in runs}:
        lo = min(r[1] for r in runs if r[0] == f)
        hi = max(r[1] + r[2] for r in runs if r[0] == f)
        data = os.pread(fds[f], hi - lo, lo)
        if len(data) != hi - lo:
            raise TensorFileError(f"{sources[f]}: ends before byte {hi} (truncated?)")
        regions[f] = (lo, memoryview(data))
    out = bytearray(nbytes)
    at = 0
    for f, off, n in runs:
        lo, data = regions[f]
        out[at : at + n] = data[off - lo : off - lo + n]
        at += n
    return out


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int, src_path: Path) -> None:
    while length > 0:
        try:
            n = os.copy_file_range(src, dst, length, src_off, dst_off)
        except OSError:  # e.g. a filesystem without it: copy through a buffer
            data = os.pread(src, min(length, 1 << 24), src_off)
            n = os.pwrite(dst, data, dst_off) if data else 0
        if n == 0:
            raise TensorFileError(f"{src_path}: ends before byte {src_off + length} (truncated?)")
        src_off, dst_off, length = src_off + n, dst_off + n, length - n
