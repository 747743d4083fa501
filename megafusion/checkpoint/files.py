"""The files every megafusion checkpoint folder shares, and how they are read and checked.

A checkpoint folder holds ``meta.json`` (step, layout, counters), ``index.json`` (every shard's
size, sha256 and tensor shapes), ``config.yaml`` (the resolved config) and safetensors shards;
a save directory holds such folders and a ``latest`` pointer. Training checkpoints
(``training_state``), conversions (``convert``), reshards (``reshard``) and exports all read
them through here, so a truncated or corrupted shard is reported the same way everywhere.
Nothing here unpickles: JSON, YAML and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from megafusion.config.loader import config_from_dict
from megafusion.config.schema import Config
from megafusion.durable import write_text

LATEST = "latest"
INDEX = "index.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match this run's layout."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, plus shape/dtype of every tensor for safetensors files."""
    entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            entry["tensors"] = {
                k: {"shape": list(f.get_slice(k).get_shape()), "dtype": f.get_slice(k).get_dtype()} for k in f.keys()
            }
    return entry


def verify_file(root: Path, rel: str, index: dict[str, Any]) -> None:
    """Raise CheckpointError naming the file if it is missing, truncated or corrupted."""
    path = root / rel
    want = index.get(rel)
    if want is None:
        raise CheckpointError(f"{path}: not listed in {root / INDEX}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {INDEX})")
    size = path.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"{path}: {size} bytes, the index says {want['bytes']} (truncated or overwritten)")
    digest = _sha256(path)
    if digest != want["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {digest[:12]}... differs from the index's {want['sha256'][:12]}... (corrupted)"
        )


def write_json(path: Path, data: Any) -> None:
    """Plain data as JSON, written atomically and durably."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def frozen_source_fingerprint(hf_dir: str | Path) -> dict[str, Any]:
    """Path and file sizes of the HF directory the frozen text tower is reloaded from."""
    files = {
        p.name: p.stat().st_size
        for p in sorted(Path(hf_dir).glob("*"))
        if p.suffix in (".safetensors", ".json") and p.is_file()
    }
    return {"path": str(hf_dir), "files": files}


def read_checkpoint_files(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], Config]:
    """meta.json, index.json and config.yaml of a complete checkpoint folder (errors name what is missing)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a complete megafusion checkpoint (no meta.json)")
    if not (path / INDEX).is_file():
        raise CheckpointError(f"{path}: no {INDEX} (written by an older megafusion); cannot verify its shards")
    meta = json.loads((path / "meta.json").read_text())
    index = json.loads((path / INDEX).read_text())
    return meta, index, config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The complete checkpoint ``latest`` points to, or None."""
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = Path(save_dir) / name
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint (no meta.json)")
    return path
