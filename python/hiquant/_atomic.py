"""Atomic outputs: a file or folder appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InvalidArgumentError


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it is renamed to ``path``.

    An existing ``path`` is never touched unless ``overwrite=True``; then it is replaced only after
    the new folder is complete. On any error (or Ctrl-C) the temporary folder is removed, so no
    partial folder is ever left under the final name. Temporary names start with ``.`` and end
    with ``.partial`` so they are never mistaken for a result.
    """
    final = Path(path).absolute()
    if final.exists() and not overwrite:
        raise InvalidArgumentError(
            f"{final} already exists; choose another output folder or pass overwrite=True "
            "(--overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the result gets the usual mode
        for f in tmp.rglob("*"):  # make the contents durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary sibling path to write; on success it is made durable and replaces
    ``path`` (os.replace), so readers see the old file or the complete new one, never a part.
    On any error (or Ctrl-C) the temporary file is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
