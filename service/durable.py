"""Writes that survive a crash: fsync of files and of the directories that name them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def write_durably(file: Path, text: str | Iterable[str]) -> None:
    """Write `text` (or its pieces, one at a time: never joined in memory) to `file` and fsync it before returning."""
    with file.open("w", encoding="utf-8") as f:
        f.writelines([text] if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that a rename or a new entry in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """fsync every file in `directory`, then the directory itself."""
    for file in directory.iterdir():
        fsync_path(file)
    fsync_path(directory)


def point_link(link: Path, target: str) -> None:
    """Atomically make the symlink `link` point at `target` (a name beside it), durably: a reader sees
    the old target or the new one, never neither."""
    temporary = link.parent / f".{link.name}.{os.getpid()}-{os.urandom(4).hex()}.link"
    os.symlink(target, temporary)  # relative: the parent can be moved or mounted elsewhere
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(link.parent)
