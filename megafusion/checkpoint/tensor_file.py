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

import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
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

    def __enter__(self) -> "TensorFile":
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

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._entry(name)["dtype"]]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its shape."""
        return self.read_flat(name, 0, self.numel(name)).view(self.shape(name))

    def read_flat(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, as a new 1-D tensor (or into ``out``)."""
        e = self._entry(name)
        dtype = DTYPES[e["dtype"]]
        numel = math.prod(e["shape"])
        if not 0 <= start <= stop <= numel:
            raise TensorFileError(f"{self.path}: range [{start}, {stop}) outside {name} of {numel} elements")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if out is None:
            out = torch.empty(stop - start, dtype=dtype)
        elif out.dtype != dtype or out.numel() != stop - start or not out.is_contiguous():
            raise ValueError(f"{self.path}: buffer for {name}[{start}:{stop}] must be {stop - start} contiguous {dtype}")
        if stop == start:
            return out
        self._f.seek(self._data_start + e["data_offsets"][0] + start * itemsize)
        buf = out.view(torch.uint8).numpy()
        got = self._f.readinto(memoryview(buf))
        if got != buf.nbytes:
            raise TensorFileError(f"{self.path}: short read of {name} ({got} of {buf.nbytes} bytes; truncated?)")
        return out


NAMES = {v: k for k, v in DTYPES.items()}


def write_tensor_file(path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                      ) -> dict[str, Any]:
    """Write a safetensors file tensor by tensor; return its index entry (bytes, sha256, tensors).

    ``entries`` are ``(name, dtype, shape, produce)``: the header needs every shape up
    front, the data does not, so each tensor is produced, written and dropped in turn
    and the file is never held in memory whole (``safetensors.torch.save_file`` holds
    the dict and a bytes copy of it). The checksum is taken from the bytes as they are
    written, so the file is not read back. Readable by ``safetensors`` like any other file.
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
    digest = hashlib.sha256(head)
    # a second thread writes and hashes tensor i while tensor i+1 is produced (one in flight)
    worker = ThreadPoolExecutor(max_workers=1)
    pending = None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, len(head) + offset)
        os.pwrite(fd, head, 0)
        for name, dtype, shape, produce in entries:
            t = produce()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path}: {name} produced {t.dtype} {tuple(t.shape)}, planned {dtype} {tuple(shape)}")
            data = memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            if pending is not None:
                pending.result()
            pending = worker.submit(_write_and_hash, fd, len(head) + header[name]["data_offsets"][0], data, digest)
        if pending is not None:
            pending.result()
    finally:
        worker.shutdown()
        os.close(fd)
    return {"bytes": len(head) + offset, "sha256": digest.hexdigest(),
            "tensors": {name: {"shape": list(shape), "dtype": NAMES[dtype]} for name, dtype, shape, _ in entries}}


def _write_and_hash(fd: int, at: int, data: memoryview, digest) -> None:
    """pwrite all of ``data`` at offset ``at`` and feed it to ``digest`` (both release the GIL)."""
    digest.update(data)
    while len(data):
        n = os.pwrite(fd, data, at)
        data, at = data[n:], at + n
