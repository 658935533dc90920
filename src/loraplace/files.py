"""Writing study files so that a crash or a power cut leaves either the old file or the new one,
never a truncated mix: the one writer every study file goes through."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_replace(path: Path, write: Callable[[Path], None], suffix: str = ".tmp") -> None:
    """Replace ``path`` by what ``write`` writes so that a reader (or a crash at any point) sees
    either the old file or the new one, never a mix: ``write`` fills a unique temp file in the same
    folder (its path is passed), which is fsynced, ``os.replace``\ d over ``path``, then the folder
    is fsynced so the rename itself is durable. The temp file is removed if anything fails.
    ``suffix``: the temp file's (a writer that picks the format from the name, like matplotlib's
    ``savefig``, needs the real one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_replace` of ``path`` by ``data``, byte for byte."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_replace` of ``path`` by ``text`` (UTF-8)."""
    atomic_replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """:func:`atomic_write_text` of ``data`` as indented JSON (unknown types as ``str``)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
