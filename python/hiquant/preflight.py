"""Checks of a run's inputs and outputs before any model work, so that a bad path, a length the
model cannot take or an impossible budget costs a second and leaves nothing behind:

* :func:`check_readable` — a calibration / evaluation text that exists and can be read;
* :func:`check_output` — an output folder whose parent can be written, and that ``overwrite``
  replaces only when it holds nothing but a previous hiquant output;
* :func:`check_lengths` — window lengths within the model's ``max_position_embeddings``;
* the budget: :func:`hiquant.allocate.check_budget`; the settings: :func:`hiquant.config.resolve`.

Errors are :class:`~hiquant.InvalidArgumentError` (a setting or path to change) or
:class:`~hiquant.OutputError` (the environment: permissions, a read-only file system).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import InvalidArgumentError, OutputError

__all__ = ["check_readable", "check_output", "check_lengths", "OUTPUT_ENTRIES", "output_error"]

# what a hiquant output folder holds (export.write_outputs): the only entries --overwrite replaces
OUTPUT_ENTRIES = {"fake", "packed", "compressed", "report.json", "report.md"}


def check_readable(path, what: str) -> Path:
    """``path`` as a Path if it is a readable file; else InvalidArgumentError naming ``what``."""
    if path is None:
        raise InvalidArgumentError(f"{what} is required: pass a text file")
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"{what} {str(p)!r} is not a file; pass an existing text file")
    if not os.access(p, os.R_OK):
        raise InvalidArgumentError(f"{what} {str(p)!r} cannot be read (permission denied)")
    return p


def output_error(path, e: OSError, what: str = "the output") -> OutputError:
    """An :class:`OutputError` for an OSError raised while writing ``path``."""
    reason = e.strerror or str(e)
    return OutputError(f"cannot write {what} {str(path)!r}: {reason}; free space, fix the "
                       "permissions or choose another folder (--out)")


def _writable_dir(folder: Path, what: str) -> None:
    d = folder
    while not d.exists():  # the first existing ancestor is where the folder would be created
        d = d.parent
    if not d.is_dir():
        raise InvalidArgumentError(f"{what}: {str(d)!r} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".hiquant-write-test.", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise output_error(d, e, what) from None


def check_output(out, overwrite: bool) -> None:
    """``out`` can be written atomically: its parent folder is writable, and an existing ``out``
    is replaced only with ``overwrite`` and only when it is empty or a previous hiquant output
    (nothing but :data:`OUTPUT_ENTRIES`, with ``report.json``) — never a folder of other files."""
    final = Path(out).absolute()
    if final.exists():
        if not overwrite:
            raise InvalidArgumentError(f"{final} already exists; choose another folder or pass "
                                       "overwrite=True (--overwrite) to replace it")
        if not final.is_dir():
            raise InvalidArgumentError(f"{final} exists and is not a folder; choose another one")
        entries = {p.name for p in final.iterdir()}
        foreign = sorted(entries - OUTPUT_ENTRIES)
        if foreign or (entries and "report.json" not in entries):
            raise InvalidArgumentError(
                f"{final} holds files hiquant did not write ({', '.join(foreign) or 'no report'}"
                f"); --overwrite replaces only a previous hiquant output — choose another folder")
    _writable_dir(final.parent, "the output folder")


def check_lengths(model, seqlen: int, what: str) -> None:
    """``seqlen`` tokens fit the model's positions (``max_position_embeddings``)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise InvalidArgumentError(f"{what} is {seqlen} tokens but the model takes at most "
                                   f"{limit} (max_position_embeddings); pass {what} <= {limit}")
