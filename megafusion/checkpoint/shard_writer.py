"""Write a safetensors shard and its index entry in one pass: bytes are hashed as they are written.

Why not ``safetensors.torch.save_file`` followed by a checksum of the file: at 70B a rank's
shards are tens of GB, and re-reading them for the checksum doubles the I/O of every save
(and, with sha256, costs minutes). Here each tensor's bytes go to the file and to the hasher
from the same buffer, then the file is fsynced; the entry returned is what ``index.json``
lists (size, checksum, shapes/dtypes), identical to what ``files.file_digest`` computes from
the finished file.

The layout is standard safetensors (8-byte header length, JSON header, 8-byte aligned data,
tensors contiguous in header order), so ``safetensors.safe_open`` and ``tensor_file.TensorFile``
read it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from megafusion.checkpoint.files import CHECKSUM, new_hasher
from megafusion.checkpoint.tensor_file import NAMES

_CHUNK = 1 << 26  # bytes per write: large enough for full disk bandwidth, small enough to bound peak memory


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, without a copy when it is contiguous (bf16 included, via a uint8 view)."""
    t = t.detach()
    if t.device.type != "cpu":
        raise ValueError(f"tensor on {t.device}: snapshot it to host memory before writing")
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor], fsync: bool = True) -> dict[str, Any]:
    """Write ``tensors`` (CPU) as a safetensors file at ``path``; return its index entry (checksum included)."""
    path = Path(path)
    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(raw)) + raw
    h = new_hasher()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(head), h)
        for t in tensors.values():
            data = _raw_bytes(t)
            for a in range(0, len(data), _CHUNK):
                _write_all(fd, data[a : a + _CHUNK], h)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return {
        "bytes": len(head) + offset,
        CHECKSUM: h.hexdigest(),
        "tensors": {name: {"shape": e["shape"], "dtype": e["dtype"]} for name, e in header.items()},
    }


def write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> dict[str, Any]:
    """A small file (JSON beside a shard) and its index entry, hashed as written."""
    h = new_hasher()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(data), h)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return {"bytes": len(data), CHECKSUM: h.hexdigest()}


def _write_all(fd: int, view: memoryview, h) -> None:
    h.update(view)
    while len(view):
        n = os.write(fd, view)
        view = view[n:]
