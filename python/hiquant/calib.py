"""Calibration and evaluation text: loaders, tokenization and random windows.

* :func:`load_text` reads plain text, WikiText-2 raw files (``wiki.{train,valid,test}.raw``: the
  lines joined with ``"\\n\\n"`` as GPTQ's ``datautils.get_wikitext2`` joins the HF dataset rows)
  or C4-style JSON / JSON Lines (optionally gzipped) whose records carry a ``text`` field (joined
  with ``"\\n\\n"``, in file order).
* :func:`tokenize_text` encodes a whole text with a ``tokenizers.Tokenizer`` (no special tokens, no
  BOS), as the reference protocol does.
* :func:`sample_windows` draws ``n`` windows of ``seqlen`` ids with the reference protocol:
  ``random.seed(seed)`` then ``start = random.randint(0, len(ids) - seqlen - 1)`` n times. It uses a
  private ``random.Random(seed)``, which yields the same sequence without touching the global state.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np

from .config import VAL_SPLITS
from .errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "load_text",
    "load_wikitext2",
    "load_jsonl_text",
    "tokenize_text",
    "sample_starts",
    "sample_windows",
    "leading_windows",
    "file_sha256",
    "calibration_windows",
    "calibration_split",
    "validation_starts",
]


def _read(path: Path, binary=False):
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: no such file; pass an existing text file") from None
    except (OSError, EOFError) as e:
        raise InvalidArgumentError(f"{path}: cannot read ({e})") from e
    if binary:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8") from e


def _require_text(text: str, path) -> str:
    if not text.strip():
        raise InvalidArgumentError(f"{path}: contains no text; pass a non-empty calibration or "
                                   "evaluation file")
    return text


def load_wikitext2(path) -> str:
    """A WikiText-2 raw file, its lines joined with ``"\\n\\n"`` as GPTQ joins the dataset rows
    (``"\\n\\n".join(data['text'])``, one row per line of the raw file)."""
    p = Path(path)
    text = _read(p)
    # The HF dataset (which GPTQ joins) has one row per line of the raw file: the line with its
    # newline, or "" for a whitespace-only line (the wikitext loading script's rule).
    rows = [line if line.strip() else "" for line in io.StringIO(text, newline=None)]
    return _require_text("\n\n".join(rows), p)


def load_jsonl_text(path, *, field: str = "text", max_records: int | None = None) -> str:
    """Records of a C4-style ``.json``/``.jsonl`` file (optionally ``.gz``) joined with ``"\\n\\n"``.
    A ``.json`` file may hold one JSON array of records instead of one record per line."""
    p = Path(path)
    raw = _read(p)
    texts = []
    stripped = raw.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(raw)
        except ValueError as e:
            raise InvalidArgumentError(f"{p}: not valid JSON ({e})") from e
    else:
        records = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise InvalidArgumentError(f"{p}:{lineno}: not valid JSON ({e}); expected one JSON "
                                           "object per line") from e
    for k, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise InvalidArgumentError(f"{p}: record {k} has no string field {field!r}; C4-style "
                                       f"files hold objects like {{\"{field}\": \"...\"}}")
        texts.append(rec[field])
        if max_records is not None and len(texts) >= max_records:
            break
    return _require_text("\n\n".join(texts), p)


def load_text(path, *, format: str = "auto") -> str:
    """Read a calibration/evaluation text file.

    ``format``: "text" (the file as is), "wikitext2", "jsonl", or "auto": ``wiki.*.raw`` →
    wikitext2, ``*.json``/``*.jsonl`` (optionally ``.gz``) → jsonl, anything else → text.
    """
    p = Path(path)
    if format == "auto":
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if name.startswith("wiki.") and name.endswith(".raw"):
            format = "wikitext2"
        elif name.endswith((".json", ".jsonl")):
            format = "jsonl"
        else:
            format = "text"
    if format == "text":
        return _require_text(_read(p), p)
    if format == "wikitext2":
        return load_wikitext2(p)
    if format == "jsonl":
        return load_jsonl_text(p)
    raise InvalidArgumentError(f"format must be 'auto', 'text', 'wikitext2' or 'jsonl', got {format!r}")


def _piece_end(text: str, start: int, size: int) -> int:
    """End of the piece of ``text`` from ``start``: the first newline at or after
    ``start + size`` with a non-whitespace character on both sides (for byte-level BPE a
    pre-tokenization boundary: the newline is a token group of its own either way)."""
    i = start + size
    while i < len(text):
        j = text.find("\n", i)
        if j < 0 or j + 1 >= len(text):
            return len(text)
        if j > 0 and not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        i = j + 1
    return len(text)


def _cut_is_exact(tokenizer, text: str, cut: int, margin: int = 2048) -> bool:
    """Whether encoding around ``cut`` in two pieces gives the tokens of one piece."""
    a, b = text[max(0, cut - margin):cut], text[cut:cut + margin]
    one = tokenizer.encode(a + b, add_special_tokens=False).ids
    two = (tokenizer.encode(a, add_special_tokens=False).ids
           + tokenizer.encode(b, add_special_tokens=False).ids)
    return one == two


def tokenize_text(tokenizer, text: str, *, max_tokens: int | None = None,
                  piece_chars: int = 1 << 16) -> np.ndarray:
    """Token ids of the text as int64 (no special tokens added), equal to encoding it whole.

    The text is encoded in pieces of about ``piece_chars`` characters, cut at newlines between
    two non-whitespace characters, so memory stays bounded by a piece; with ``max_tokens``,
    encoding stops once that many tokens exist (the result is then their first ``max_tokens``).
    Each cut is verified (the tokens around it encoded as one piece and as two); a tokenizer
    for which a cut is not a token boundary gets the whole text encoded at once instead."""
    if tokenizer is None:
        raise InvalidArgumentError("the model has no tokenizer.json; pass token ids directly or "
                                   "add the tokenizer to the checkpoint folder")
    if not isinstance(text, str):
        raise InvalidTypeError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise InvalidArgumentError("text is empty; pass the contents of a calibration file")
    parts, n, start = [], 0, 0
    while start < len(text) and (max_tokens is None or n < max_tokens):
        end = _piece_end(text, start, piece_chars)
        if end < len(text) and not _cut_is_exact(tokenizer, text, end):
            parts, end = [], len(text)  # not a token boundary for this tokenizer: whole text
            start = 0
        ids = tokenizer.encode(text[start:end], add_special_tokens=False).ids
        parts.append(np.asarray(ids, dtype=np.int64))
        n += len(ids)
        start = end
    out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return out[:max_tokens] if max_tokens is not None else out


def _check_int(v, name, minimum):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def sample_starts(n_tokens: int, n: int, seqlen: int, seed: int = 0, *,
                  free: np.ndarray | None = None) -> np.ndarray:
    """First token of each of ``n`` windows of ``seqlen`` in an ``n_tokens``-token text, (n,)
    int64, exactly as the reference code draws them: ``random.seed(seed); i = random.randint(0,
    n_tokens - seqlen - 1)`` per window. ``free`` (bool, one entry per possible start): a draw on
    a start that is not free is drawn again from the same stream (at least one must be free)."""
    rng = random.Random(seed)
    last = n_tokens - seqlen - 1
    out = np.empty(n, dtype=np.int64)
    for k in range(n):
        i = rng.randint(0, last)
        while free is not None and not free[i]:
            i = rng.randint(0, last)
        out[k] = i
    return out


def sample_windows(ids: np.ndarray, n: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``n`` random windows of ``seqlen`` ids, (n, seqlen) int64, exactly as the reference code
    draws them (:func:`sample_starts`)."""
    n = _check_int(n, "n", 1)
    seqlen = _check_int(seqlen, "seqlen", 2)
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if len(ids) < seqlen + 1:
        raise InvalidArgumentError(f"the text has {len(ids)} tokens but windows of {seqlen} need "
                                   f"at least {seqlen + 1}; use a longer text or a smaller seqlen")
    return _windows_at(ids, sample_starts(len(ids), n, seqlen, seed), seqlen)


def _windows_at(ids: np.ndarray, starts, seqlen: int) -> np.ndarray:
    return np.ascontiguousarray(np.stack([ids[i:i + seqlen] for i in starts]).astype(np.int64))


def leading_windows(ids: np.ndarray, seqlen: int, windows: int | None = None) -> np.ndarray:
    """The first ``windows`` non-overlapping windows of ``seqlen`` ids (all that fit when None),
    (windows, seqlen) int64: the evaluation protocol."""
    seqlen = _check_int(seqlen, "seqlen", 2)
    ids = np.asarray(ids)
    avail = len(ids) // seqlen
    if windows is None:
        windows = avail
    windows = _check_int(windows, "windows", 1)
    if windows > avail:
        fix = (f"pass at most {avail} windows (--windows / --eval-windows {avail})" if avail
               else "use a longer text or shorter windows (--seqlen / --eval-seqlen)")
        raise InvalidArgumentError(f"the text has {len(ids)} tokens: {avail} windows of {seqlen}, "
                                   f"fewer than the {windows} requested; {fix}")
    return np.ascontiguousarray(ids[:windows * seqlen].reshape(windows, seqlen).astype(np.int64))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validation_starts(n_tokens: int, val_windows: int, val_seqlen: int,
                      split: str = "spread") -> np.ndarray:
    """First token of each validation window (sorted, non-overlapping), independent of the seed:

    * ``"spread"``: the text cut into ``val_windows`` equal stretches of ``n_tokens //
      val_windows`` tokens, one window centred in each, so validation follows the whole text;
    * ``"tail"``: the last ``val_windows * val_seqlen`` tokens, consecutive windows.
    """
    if split not in VAL_SPLITS:
        raise InvalidArgumentError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got {split!r}")
    if split == "tail":
        cut = n_tokens - val_windows * val_seqlen
        return cut + val_seqlen * np.arange(val_windows, dtype=np.int64)
    stride = n_tokens // max(val_windows, 1)
    return (stride * np.arange(val_windows, dtype=np.int64)
            + max(stride - val_seqlen, 0) // 2)


def _sample_around(ids: np.ndarray, n: int, seqlen: int, seed: int, held: np.ndarray,
                   held_len: int) -> np.ndarray:
    """The reference draw (:func:`sample_starts`), a draw whose window would overlap a held-out
    window ``[h, h + held_len)`` drawn again."""
    last = len(ids) - seqlen - 1
    # a start i is free when no held window begins in (i - held_len, i + seqlen)
    free = np.ones(last + 1, bool)
    for h in held:
        free[max(h - seqlen + 1, 0):min(h + held_len, last + 1)] = False
    if not free.any():
        raise InvalidArgumentError(
            f"no {seqlen}-token calibration window fits between the {len(held)} validation "
            f"windows of {held_len} tokens in this {len(ids)}-token text; pass fewer val_windows "
            f"(--val-windows) or a longer calibration text")
    return _windows_at(ids, sample_starts(len(ids), n, seqlen, seed, free=free), seqlen)


def calibration_split(tokenizer, path, n: int = 128, seqlen: int = 512, seed: int = 0, *,
                      val_windows: int = 0, val_seqlen: int = 512, val_split: str = "spread",
                      format: str = "auto") -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Calibration windows and a validation split carved from the same text:
    ``(windows, validation, settings)``.

    ``val_windows`` windows of ``val_seqlen`` tokens are held out where
    :func:`validation_starts` puts them (``val_split``: ``"spread"`` evenly over the text,
    ``"tail"`` its last tokens) and no calibration window overlaps them: with ``"tail"`` the
    ``n`` windows are the reference draw (:func:`sample_windows`) over the text before the tail;
    with ``"spread"`` the reference draw over the whole text, a draw that would overlap a
    validation window drawn again. ``validation`` is ``(val_windows, val_seqlen)`` ids (the
    evaluation protocol's shape), or None when ``val_windows`` is 0 — then the windows and
    settings equal :func:`calibration_windows`'. ``settings`` records the file, its sha256, n,
    seqlen, seed, the token count and, with a split, ``validation = {windows, seqlen, split,
    first_token, tokens}`` (``first_token``: the first validation token, i.e. the tail's start
    or the first spread window's). Choose defaults and iteration counts on the validation
    windows, never on the test text.
    """
    val_windows = _check_int(val_windows, "val_windows", 0)
    val_seqlen = _check_int(val_seqlen, "val_seqlen", 2)
    text = load_text(path, format=format)
    ids = tokenize_text(tokenizer, text)
    held = val_windows * val_seqlen
    settings = {"file": os.path.abspath(path), "file_sha256": file_sha256(path), "format": format,
                "n": int(n), "seqlen": int(seqlen), "seed": int(seed), "n_text_tokens": int(len(ids))}
    if not held:
        return sample_windows(ids, n, seqlen, seed), None, settings
    starts = validation_starts(len(ids), val_windows, val_seqlen, val_split)
    if len(ids) - held < seqlen + 1 or (val_split == "spread"
                                        and len(ids) // val_windows < val_seqlen):
        raise InvalidArgumentError(
            f"the calibration text has {len(ids)} tokens: holding out {val_windows} validation "
            f"windows of {val_seqlen} leaves {max(len(ids) - held, 0)}, fewer than one "
            f"{seqlen}-token calibration window needs; pass fewer val_windows (--val-windows)")
    if val_split == "tail":
        win = sample_windows(ids[:int(starts[0])], n, seqlen, seed)
    else:
        win = _sample_around(ids, n, seqlen, seed, starts, val_seqlen)
    val = _windows_at(ids, starts, val_seqlen)
    settings["validation"] = {"windows": int(val_windows), "seqlen": int(val_seqlen),
                              "split": val_split, "first_token": int(starts[0]),
                              "tokens": int(held)}
    return win, val, settings


def calibration_windows(tokenizer, path, n: int = 128, seqlen: int = 512, seed: int = 0,
                        *, format: str = "auto") -> tuple[np.ndarray, dict]:
    """Read, tokenize and sample: ``(windows, settings)`` where settings records the file, its
    sha256, n, seqlen, seed and the token count (the calibration part of a stats cache key).
    :func:`calibration_split` also holds out a validation split."""
    win, _, settings = calibration_split(tokenizer, path, n, seqlen, seed, format=format)
    return win, settings
