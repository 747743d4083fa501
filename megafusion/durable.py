"""Publishing files and folders by rename, durably: every writer of a checkpoint, shard or config goes here.

A reader must see either the old version or the complete new one, also after a crash or a power loss.
So content is written under a temporary name, flushed to disk (``fsync``), renamed over the final
name with ``os.replace`` (atomic within a filesystem), and the parent directory is flushed so the
rename itself survives. This module imports nothing from megafusion: every layer may use it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a directory entry, to disk before it is made visible by a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder (children before their folder)."""
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
    fsync_path(path)


def publish(tmp: str | Path, final: str | Path, *, replace_dir: bool = True) -> Path:
    """Make ``tmp`` (a file or a folder, fully written) visible as ``final``, durably.

    ``tmp`` is flushed (a folder with everything in it), renamed onto ``final`` and the parent is
    flushed. An existing folder at ``final`` is removed first when ``replace_dir`` (``os.replace``
    cannot replace a non-empty folder); an existing file is replaced atomically.
    """
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    if replace_dir and final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent if str(final.parent) else Path("."))
    return final


def temp_sibling(path: str | Path, suffix: str = ".tmp") -> Path:
    """A fresh name beside ``path`` for its temporary version (unique, so concurrent writers do not collide)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and durably (temporary file, fsync, rename, fsync the folder)."""
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.write_text(text)
    return publish(tmp, path)
