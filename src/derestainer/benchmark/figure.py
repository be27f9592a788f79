"""``figure.png`` of a Table-1 benchmark (paper Fig. 3 layout): one row per HER2 level; H&E, each method, ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from derestainer.benchmark.spec import BenchmarkSpec, run_dir
from derestainer.core.io import list_images, read_image
from derestainer.core.levels import UNKNOWN, level_from_name, level_name
from derestainer.viz import image_grid


def pick_examples(he_test: Path) -> list[tuple[int, str]]:
    """One test image per HER2 level present (the first by name): ``[(level, file name), ...]``.

    Without levels in the names: the first four images, with level ``-1``.
    """
    chosen: dict[int, str] = {}
    for p in list_images(he_test):
        lv = level_from_name(p.name)
        if lv is not None and lv not in chosen:
            chosen[lv] = p.name
    if not chosen:  # no levels in the names: show the first images instead
        return [(UNKNOWN, p.name) for p in list_images(he_test)[:4]]
    return sorted(chosen.items())


def _fit(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == hw:
        return img
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def make_figure(spec: BenchmarkSpec, dirs: dict[str, Path], path: Path) -> Path:
    """Fig. 3 layout: one row per HER2 level; columns H&E, each method (first seed), ground truth."""
    seed = spec.seeds[0]
    examples = pick_examples(dirs["he_test"])
    rows = []
    for _lv, name in examples:
        gt = read_image(dirs["ihc_test"] / name)
        hw = (int(gt.shape[0]), int(gt.shape[1]))
        row = [_fit(read_image(dirs["he_test"] / name), hw)]
        for m in spec.models:
            pred = run_dir(spec, m, seed) / "pred" / Path(name).with_suffix(".png")
            row.append(_fit(read_image(pred), hw))
        row.append(gt)
        rows.append(row)
    labels = [f"HER2 {level_name(lv)}" if lv != UNKNOWN else name for lv, name in examples]
    # About 120 k image pixels in all (48–160 px per cell, never above the images' own size) keep the
    # PNG under ~300 KB, small enough for docs/figures.
    dpi = 80
    px = min(160, rows[0][0].shape[1], max(48, int((120_000 / (len(rows) * len(rows[0]))) ** 0.5)))
    cell = px / dpi
    return image_grid(rows, path, row_labels=labels, col_labels=["H&E", *spec.models, "ground truth"],
                      cell_inches=cell, dpi=dpi)
