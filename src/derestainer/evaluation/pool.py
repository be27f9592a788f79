"""The per-image pass of an evaluation, run in worker processes, one image pair per task.

Each task reads both images, resizes the prediction to the ground truth's size, computes SSIM/PSNR
and the stain statistics, and makes a small grey thumbnail of each for the pairing check.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from derestainer.core.errors import EvaluationError
from derestainer.core.io import read_image
from derestainer.metrics import pixel, stain

#: Side of the grey thumbnails used by the pairing check.
THUMB_SIZE: int = 32


@dataclass(frozen=True)
class PairTask:
    """One image pair to score: its index in the pairing, the two paths, and the stain thresholds."""

    index: int
    pred: str
    gt: str
    keep_images: bool
    dab_threshold: float
    h_threshold: float


def _thumb(img: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(img).convert("L").resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32).ravel()


def evaluate_pair(task: PairTask) -> dict[str, Any]:
    """Metrics of one pair (module-level so that worker processes can import it)."""
    gt = read_image(task.gt)
    pred_native = read_image(task.pred)
    try:
        pred = pixel.resize_to(pred_native, gt.shape[:2])
        m = pixel.ssim(gt, pred), pixel.psnr(gt, pred)
    except ValueError as exc:
        raise EvaluationError(f"{task.pred} (ground truth {task.gt}): {exc}") from None
    sp = stain.stain_stats(pred, task.dab_threshold, task.h_threshold)
    sg = stain.stain_stats(gt, task.dab_threshold, task.h_threshold)
    out: dict[str, Any] = {
        "index": task.index, "ssim": m[0], "psnr": m[1],
        "pred_size": f"{pred_native.shape[1]}x{pred_native.shape[0]}", "gt_size": f"{gt.shape[1]}x{gt.shape[0]}",
        **{f"{k}_pred": v for k, v in sp.items()}, **{f"{k}_gt": v for k, v in sg.items()},
        "thumb_pred": _thumb(pred), "thumb_gt": _thumb(gt),
    }
    if task.keep_images:
        out["img_pred"], out["img_gt"] = pred, gt
    return out


def iterate_pairs(tasks: list[PairTask], workers: int) -> Iterator[dict[str, Any]]:
    """Results of :func:`evaluate_pair` for every task, in completion order, from ``workers`` processes."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield evaluate_pair(t)
        return
    # spawn, not fork: the parent may hold torch (the evaluator) and its thread pools, which do not survive fork.
    ctx = multiprocessing.get_context("spawn")
    n_proc = min(workers, len(tasks))
    # At most 2 tasks per worker in flight: results may carry full-size images for the evaluator, and a
    # slow consumer (a CPU evaluator) must hold the workers back rather than let results pile up in memory.
    window = 2 * n_proc
    with ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx) as pool:
        running: set[Future[dict[str, Any]]] = set()
        try:
            for t in tasks:
                running.add(pool.submit(evaluate_pair, t))
                if len(running) >= window:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in running:
                f.cancel()
