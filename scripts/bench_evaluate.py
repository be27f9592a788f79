"""Time ``derestainer evaluate``'s per-image pass (SSIM/PSNR, stain statistics) on synthetic BCI-sized pairs.

Creates N pairs in the BCI shape — 1024 px ground truth, 512 px prediction (resized back up by the
evaluation, as for the paper's 512 px generator) — from smooth random stain-concentration fields
rendered by Beer–Lambert, then times :func:`derestainer.evaluation.evaluate` without an
evaluator classifier. Image creation is not timed; reading the PNGs is (it is part of evaluating).

    nice -n 10 python scripts/bench_evaluate.py --n 200 --workers 2

Prints one JSON line: images, workers, wall seconds, images/s, CPU seconds per image (all processes;
insensitive to other load on the machine), the 1-minute load average, and the mean SSIM/PSNR (sanity).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: bicubic upsampling of a ``cells × cells`` noise image."""
    low = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.clip(np.asarray(low.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def make_pair(rng: np.random.Generator, gt_size: int = 1024, pred_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """An IHC-like ground truth (H blobs, DAB patches) and an imperfect, half-size "prediction" of it."""
    from derestainer.stain import hed_to_rgb_np  # here: --help answers without loading torch

    h = np.clip(_field(rng, gt_size, 96) * 2.0 - 0.9, 0, None) * 0.06
    dab = np.clip(_field(rng, gt_size, 24) * 2.5 - 1.4, 0, None) * rng.uniform(0.0, 0.1)
    fine = (rng.random((gt_size, gt_size)) - 0.5) * 0.01
    hed = np.stack([np.clip(h + fine, 0, None), np.zeros_like(h), dab], axis=-1)
    gt = (hed_to_rgb_np(hed) * 255).round().astype(np.uint8)
    pred = np.asarray(Image.fromarray(gt).resize((pred_size, pred_size), Image.BICUBIC)).astype(np.int16)
    pred = np.clip(pred + rng.integers(-12, 13, pred.shape), 0, 255).astype(np.uint8)
    return gt, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="number of pairs")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="evaluation processes")
    ap.add_argument("--gt-size", type=int, default=1024)
    ap.add_argument("--pred-size", type=int, default=512)
    ap.add_argument("--data", type=Path, default=None, help="reuse/keep the synthetic pairs here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from derestainer.evaluation import evaluate  # after parsing: --help answers without loading torch

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data if args.data is not None else Path(tmp)
        gt_dir, pred_dir = root / "gt", root / "pred"
        gt_dir.mkdir(parents=True, exist_ok=True)
        pred_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(args.seed)
        levels = ("0", "1+", "2+", "3+")
        t0 = time.perf_counter()
        for i in range(args.n):
            name = f"{i:05d}_test_{levels[i % 4]}.png"
            if (gt_dir / name).is_file() and (pred_dir / name).is_file():
                continue
            gt, pred = make_pair(rng, args.gt_size, args.pred_size)
            # compress_level 1: quick to write; decoding cost is close to BCI's default-compressed PNGs.
            Image.fromarray(gt).save(gt_dir / name, compress_level=1)
            Image.fromarray(pred).save(pred_dir / name, compress_level=1)
        t_make = time.perf_counter() - t0
        def cpu() -> float:
            own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        c0, t0 = cpu(), time.perf_counter()
        res = evaluate(pred_dir, gt_dir, workers=args.workers, progress=False)
        seconds = time.perf_counter() - t0
        # CPU time of this process and of the (finished) worker processes: independent of other load
        # on the machine, unlike wall time; includes the workers' start-up (imports).
        cpu_seconds = cpu() - c0
    print(json.dumps({
        "images": args.n, "gt_size": args.gt_size, "pred_size": args.pred_size, "workers": args.workers,
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "seconds": round(seconds, 2), "images_per_s": round(args.n / seconds, 2),
        "cpu_seconds_per_image": round(cpu_seconds / args.n, 3),
        "ssim_mean": round(res.metrics["pixel"]["ssim"]["mean"], 4), "psnr_mean": round(res.metrics["pixel"]["psnr"]["mean"], 2),
        "data_seconds_untimed": round(t_make, 1),
    }))


if __name__ == "__main__":
    main()
