"""Pairing generated images with their ground truth by file name (stem).

A ground truth without a prediction, a prediction without a ground truth, two files with one stem,
or an empty folder is an error naming them, never silently skipped; ``allow_missing=True`` pairs
the common names and reports how many were left out. Levels come from the BCI names or from a
label CSV (:func:`derestainer.core.levels.read_labels_csv`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from derestainer.core.errors import EvaluationError
from derestainer.core.io import list_images
from derestainer.core.levels import HER2_LEVELS, UNKNOWN, level_from_name


@dataclass(frozen=True)
class Pair:
    """One generated image and its ground truth. ``level``: HER2 level 0..3 of the ground truth, -1 unknown."""

    name: str
    pred: Path
    gt: Path
    level: int = UNKNOWN


@dataclass
class Pairing:
    """Result of :func:`match_pairs`: the pairs (sorted by name) and the names left out."""

    pairs: list[Pair]
    missing: list[str] = field(default_factory=list)  # ground truths without a prediction
    extra: list[str] = field(default_factory=list)  # predictions without a ground truth


def _index_folder(folder: Path, role: str, strip_suffix: str = "") -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: {role} folder does not exist")
    index: dict[str, Path] = {}
    for p in list_images(folder):
        stem = p.stem
        if strip_suffix and stem.endswith(strip_suffix):
            stem = stem[: -len(strip_suffix)]
        if stem in index:
            raise EvaluationError(f"{role} folder {folder} holds two images named {stem!r}: {index[stem].name} and {p.name}")
        index[stem] = p
    return index


def listing(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c (and 7 more)``: the first ``limit`` names, for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _without_level(stem: str) -> str:
    """``00001_test_1+`` → ``00001_test``; a stem without a level suffix is returned as is."""
    lv = level_from_name(stem)
    return stem if lv is None else stem[: -len("_" + HER2_LEVELS[lv])]


def _mismatch_message(missing: list[str], extra: list[str], n_common: int, pred_dir: object, gt_dir: object) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} ground-truth image(s) have no prediction in {pred_dir}: {listing(missing)}")
    if extra:
        parts.append(f"{len(extra)} prediction(s) have no ground truth in {gt_dir}: {listing(extra)}")
    hint = ""
    base_m = {_without_level(n): n for n in missing}
    swapped = [(base_m[_without_level(e)], e) for e in extra if _without_level(e) in base_m]
    if swapped:
        g, pr = swapped[0]
        hint = (f"; {len(swapped)} name(s) differ only in the HER2 level suffix (e.g. ground truth {g!r}, "
                f"prediction {pr!r}): predictions must keep the ground truth's name")
    return ("; ".join(parts) + hint
            + f". Pairs are matched by file name; use --allow-missing to evaluate the {n_common} common name(s).")


def match_pairs(
    pred_dir: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    allow_missing: bool = False,
    labels: dict[str, int] | None = None,
    pred_suffix: str = "",
) -> Pairing:
    """Pair predictions with ground truths by file stem.

    Args:
        pred_suffix: stripped from prediction stems before matching (e.g. ``_fake_B`` for pix2pix output).
        labels: ``{stem: level}`` overriding levels read from BCI names.
    Raises:
        EvaluationError: names that do not pair up (unless ``allow_missing``), duplicates, empty folders.
    """
    preds = _index_folder(Path(pred_dir), "prediction", pred_suffix)
    gts = _index_folder(Path(gt_dir), "ground-truth", "")
    if not gts:
        raise EvaluationError(f"{gt_dir}: no images in the ground-truth folder")
    if not preds:
        raise EvaluationError(f"{pred_dir}: no images in the prediction folder")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    common = sorted(set(gts) & set(preds))
    if (missing or extra) and not allow_missing:
        raise EvaluationError(_mismatch_message(missing, extra, len(common), pred_dir, gt_dir))
    if not common:
        raise EvaluationError(f"no file names in common between {pred_dir} and {gt_dir}")
    pairs = []
    for n in common:
        lv = labels.get(n) if labels is not None else None
        if lv is None or lv < 0:  # not in the CSV, or unknown there: the BCI name may still carry it
            lv = level_from_name(n)
        pairs.append(Pair(name=n, pred=preds[n], gt=gts[n], level=UNKNOWN if lv is None else int(lv)))
    return Pairing(pairs=pairs, missing=missing, extra=extra)
