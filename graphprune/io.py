"""Atomic file writes (a failed write leaves nothing behind and never a half-written file), and
reading a user's file with an error that names it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from .errors import GraphPruneError


class OutputError(GraphPruneError, OSError):
    """An output file or directory cannot be written."""


def read_file(path: str | os.PathLike, what: str, error: type[GraphPruneError],
              text: bool = False) -> str | bytes:
    """The contents of ``path``; an unreadable file raises ``error`` naming ``what`` it was."""
    path = os.fspath(path)
    try:
        with open(path, "r" if text else "rb", **({"encoding": "utf-8"} if text else {})) as f:
            return f.read()
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e.strerror}.") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically,
    on any exception it is removed."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OutputError(f"cannot write '{path}': directory '{d}' does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gp-", suffix=".part", dir=d)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror} (directory '{d}').") from e
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[str]:
    """Yield a hidden staging directory inside ``out``; its files move into ``out`` only when
    the block succeeds. On failure nothing is left behind (``out`` too, if this created it)."""
    out = os.path.abspath(os.fspath(out))
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".graphprune-", dir=out)
    except OSError as e:
        raise OutputError(f"cannot write to output directory '{out}': {e.strerror}.") from e
    try:
        yield stage
        for name in sorted(os.listdir(stage)):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_writable(out: str | os.PathLike) -> None:
    """Fail early if ``out`` (a directory, created if missing) cannot be written; leaves no trace."""
    out = os.path.abspath(os.fspath(out))
    probe = out
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputError(f"cannot write to output directory '{out}': '{probe}' is not a directory.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output directory '{out}': '{probe}' is not writable.")
