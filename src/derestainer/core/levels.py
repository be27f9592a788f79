"""HER2 levels: the names, how they are read from BCI file names and label CSVs, and the confusion matrix.

Levels are class indices ``0..3`` for ``0, 1+, 2+, 3+``; ``-1`` means unknown (MIST, or a folder
without labels). This module is the only place that knows how a level is spelled.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derestainer.core.errors import LabelError

#: HER2 levels in class-index order.
HER2_LEVELS: tuple[str, ...] = ("0", "1+", "2+", "3+")
#: Level token → class index.
LEVEL_TOKENS: dict[str, int] = {tok: i for i, tok in enumerate(HER2_LEVELS)}
#: Class index of an unknown level.
UNKNOWN = -1

#: A BCI file stem: ``NNNNN_{split}_{label}`` (e.g. ``00012_train_2+``).
BCI_NAME = re.compile(r"^(?P<index>\d+)_(?P<split>[A-Za-z]+)_(?P<label>[^_]+)$")
_LEVEL_SUFFIX = re.compile(r"_(0|1\+|2\+|3\+)$")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_HEADER_NAMES = ("name", "file", "filename", "image", "stem")


def level_name(level: int) -> str:
    """``0..3`` → ``'0', '1+', '2+', '3+'``; anything else (e.g. -1) → ``'unknown'``."""
    return HER2_LEVELS[level] if 0 <= level < len(HER2_LEVELS) else "unknown"


def parse_level(value: Any, where: str = "HER2 level", allow_unknown: bool = True) -> int:
    """A level given as ``0..3`` or ``'0' '1+' '2+' '3+' '1' '2' '3'`` → ``0..3``.

    ``-1``, ``''``, ``'unknown'``, ``'na'`` and ``'nan'`` give ``-1`` when ``allow_unknown``.

    Raises:
        LabelError: naming ``where``, for anything else.
    """
    if isinstance(value, bool):
        raise LabelError(f"{where}: HER2 level must be 0, 1+, 2+ or 3+, got {value!r}")
    if isinstance(value, (int, np.integer)):
        lvl = int(value)
    else:
        s = str(value).strip().lower()
        if s in ("", "-1", "unknown", "na", "nan"):
            lvl = UNKNOWN
        elif s in LEVEL_TOKENS:
            return LEVEL_TOKENS[s]
        else:
            try:
                lvl = int(s)
            except ValueError:
                raise LabelError(f"{where}: HER2 level must be 0, 1+, 2+ or 3+, got {value!r}") from None
    if lvl == UNKNOWN and allow_unknown:
        return UNKNOWN
    if not 0 <= lvl <= 3:
        allowed = "0..3 or -1 (unknown)" if allow_unknown else "0..3"
        raise LabelError(f"{where}: HER2 level must be {allowed}, got {value!r}")
    return lvl


def parse_bci_level(name: str | os.PathLike[str]) -> int:
    """The level of a BCI file (``00012_train_2+.png`` → 2); ``name`` may be a path.

    Raises:
        LabelError: the name does not follow ``NNNNN_{split}_{0|1+|2+|3+}``, or its label is unknown.
    """
    stem = Path(name).stem
    m = BCI_NAME.match(stem)
    if m is None:
        raise LabelError(f"{name}: not a BCI file name; expected NNNNN_{{split}}_{{0|1+|2+|3+}}.png")
    label = m.group("label")
    if label not in LEVEL_TOKENS:
        raise LabelError(f"{name}: unknown HER2 label {label!r}; BCI names end in _0, _1+, _2+ or _3+")
    return LEVEL_TOKENS[label]


def level_from_name(name: str | os.PathLike[str]) -> int | None:
    """The level a file name ends in (``…_2+`` or ``…_2+.png`` → 2), or None when it carries none."""
    stem = Path(name).stem if Path(name).suffix.lower() in _IMAGE_SUFFIXES else str(Path(name).name)
    m = _LEVEL_SUFFIX.search(stem)
    return LEVEL_TOKENS[m.group(1)] if m else None


def name_key(name: str) -> str:
    """How an image is named in a label CSV: its stem when the name has an image suffix, else as given."""
    return Path(name).stem if Path(name).suffix.lower() in _IMAGE_SUFFIXES else name


def read_labels_csv(path: str | os.PathLike[str]) -> dict[str, int]:
    """The one label-CSV format: rows ``name,level``, an optional header, ``#`` comments.

    With a header (a first row naming a ``name``/``file``/``filename``/``image``/``stem`` column), the
    name and ``level`` columns are found by their names, in any order, among other columns.

    ``name`` is a file name or stem; ``level`` is ``0, 1+, 2+, 3+`` (or ``0..3``; ``-1``/empty for
    unknown). Returns ``{stem: level}``.

    Raises:
        LabelError: the file is missing, a row is malformed, a level unknown, or a name listed twice
            with different levels (the message names the file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise LabelError(f"{p}: label CSV not found (expected rows 'name,level')")
    out: dict[str, int] = {}
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{p}: cannot read label CSV ({exc})") from exc
    name_col, level_col, seen_row = 0, 1, False
    for lineno, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        first, seen_row = not seen_row, True
        cells = [c.strip() for c in row]
        if first and any(c.lower() in _HEADER_NAMES for c in cells):  # a header: columns found by name
            lower = [c.lower() for c in cells]
            if "level" not in lower:
                raise LabelError(f"{p}:{lineno}: the header names no 'level' column")
            name_col = next(i for i, c in enumerate(lower) if c in _HEADER_NAMES)
            level_col = lower.index("level")
            continue
        if len(cells) <= max(name_col, level_col):
            raise LabelError(f"{p}:{lineno}: expected 'name,level', got {','.join(row)!r}")
        name, value = cells[name_col], cells[level_col]
        level = parse_level(value, f"{p}:{lineno}")
        stem = name_key(name)
        if stem in out and out[stem] != level:
            raise LabelError(f"{p}:{lineno}: {stem!r} is listed twice with different levels")
        out[stem] = level
    return out


def confusion_matrix(true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray,
                     n_levels: int = len(HER2_LEVELS)) -> np.ndarray:
    """``[n_levels, n_levels]`` int64 counts: row = true level, column = predicted level.

    Pairs in which either level is unknown (< 0) are skipped.

    Raises:
        ValueError: the two sequences differ in length, or a level is ``>= n_levels``.
    """
    t = np.asarray(true, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and predicted levels must pair up: {t.size} vs {p.size}")
    ok = (t >= 0) & (p >= 0)
    if np.any(t[ok] >= n_levels) or np.any(p[ok] >= n_levels):
        raise ValueError(f"levels must lie in 0..{n_levels - 1}")
    return np.bincount(t[ok] * n_levels + p[ok], minlength=n_levels * n_levels).reshape(n_levels, n_levels)
