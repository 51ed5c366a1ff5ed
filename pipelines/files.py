"""Atomic file output: a file either appears complete under its name, or not at all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from or_agent.pipelines.errors import InputError


def refuse_file_in_the_way(path: str | os.PathLike) -> Path:
    """``path``, unless something other than a directory is there: checked by commands before their slow
    start (listing videos, loading models), so the mistake is named at once."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    return out


def make_output_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory, created with its parents where missing. A file in the way, or a place that
    cannot hold a directory (no such parent, no permission, a read-only or virtual file system), is one
    ``InputError`` naming the path, not a traceback."""
    out = refuse_file_in_the_way(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{exc.filename or out}: cannot create the directory ({exc.strerror or exc})") from None
    return out


@contextlib.contextmanager
def output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``make_output_dir`` for a command's results, made before its work (a place that cannot hold them
    fails then, not after minutes of work); the folders it made are removed again on the way out if nothing
    was written into them (the command failed, or had nothing to write): no empty folder is left behind."""
    out = Path(path)
    made = []  # the folders missing now, innermost first
    missing = out
    while not missing.exists() and missing.parent != missing:
        made.append(missing)
        missing = missing.parent
    make_output_dir(out)
    try:
        yield out
    finally:
        for folder in made:
            try:
                folder.rmdir()  # only an empty folder goes
            except OSError:
                break


def part_path(path: Path) -> Path:
    """The temporary name a file is written under; keeps the suffix so writers pick the format."""
    return path.with_name(f"{path.stem}.part{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path to write; renamed onto ``path`` only if the block succeeds."""
    final = Path(path)
    tmp = part_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    """``durable``: the bytes are fsynced before the rename (for files costly to remake, like engines)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a created or renamed file's directory entry durable."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open a directory (Windows) have nothing to sync here
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories (EINVAL); the data itself is synced
        pass
    finally:
        os.close(fd)
