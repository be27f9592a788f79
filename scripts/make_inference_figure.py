#!/usr/bin/env python
"""Figure for docs/inference.md: a real H&E slide beside its virtual IHC and HER2 heat map.

Runs ``derestainer translate-slide``'s library path on a real slide with a trained model, then
draws the H&E (resampled to the model's resolution), the virtual IHC read back from the written
OME-TIFF, and the per-tile expected HER2 level. Prints the timing line recorded in the docs.

    python scripts/make_inference_figure.py --checkpoint runs/tiny \\
        --slide ../shared/data/real/slides/cmu_small_region.svs --out docs/figures/inference_slide.png

The slide and the model are arguments: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--checkpoint", required=True, help="model file, checkpoint folder or run folder")
    ap.add_argument("--slide", required=True, help="a real H&E slide (SVS, TIFF, …)")
    ap.add_argument("--out", default="docs/figures/inference_slide.png")
    ap.add_argument("--mpp", type=float, default=None, help="slide µm/px where the file lacks it")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--region", type=int, nargs=4, metavar=("X", "Y", "W", "H"), default=None,
                    help="crop of the output (model pixels) to show; default: the whole slide")
    ap.add_argument("--label", default="model trained on SynthBCI (synthetic data)",
                    help="what the model is, printed in the figure")
    args = ap.parse_args()

    # imported after parsing, so that --help answers without loading matplotlib and torch
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile

    from derestainer.inference import SlideOptions, load_model, translate_slide
    from derestainer.inference.plan import plan_slide, read_model_region
    from derestainer.inference.slide_outputs import heatmap_grid
    from derestainer.inference.slides import open_slide

    lm = load_model(args.checkpoint, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slide.ome.tiff"
        t0 = time.perf_counter()
        summary = translate_slide(lm, args.slide, out, SlideOptions(
            tile=args.tile, overlap=args.overlap, slide_mpp=args.mpp, compression="lossless", progress=False))
        wall = time.perf_counter() - t0
        with tifffile.TiffFile(out) as tf:
            ihc = tf.series[0].levels[0].asarray()
        tiles_csv = (out.parent / "slide.tiles.csv").read_text().splitlines()
    with open_slide(args.slide) as reader:
        plan = plan_slide(reader, lm.mpp, tile=args.tile, overlap=args.overlap, slide_mpp=args.mpp)
        he = read_model_region(reader, plan, 0, 0, plan.height, plan.width)
    x, y, w, h = args.region or (0, 0, plan.width, plan.height)
    he, ihc = he[y:y + h, x:x + w], ihc[y:y + h, x:x + w]

    # Per-tile expected level from the tiles CSV, painted at tile centres' nearest cells.
    header = tiles_csv[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in tiles_csv[1:]]
    grid = plan.grid
    probs = [[None] * grid.n_cols for _ in range(grid.n_rows)]
    names = [c[2:] for c in header if c.startswith("p_")]
    for r in rows:
        if r["expected_level"]:
            probs[int(r["row"])][int(r["col"])] = [float(r[f"p_{n}"]) for n in names]
    heat = heatmap_grid(probs)
    cy = np.abs((np.arange(plan.height) + 0.5)[:, None] - (grid.ys + grid.tile / 2)[None, :]).argmin(1)
    cx = np.abs((np.arange(plan.width) + 0.5)[:, None] - (grid.xs + grid.tile / 2)[None, :]).argmin(1)
    heat_img = heat[cy[:, None], cx[None, :]][y:y + h, x:x + w]

    fig, axes = plt.subplots(1, 3, figsize=(13, 13 / 3 * h / w + 1.2), dpi=90)
    axes[0].imshow(he)
    axes[0].set_title(f"H&E ({Path(args.slide).name}, {lm.mpp:g} µm/px)")
    axes[1].imshow(ihc)
    axes[1].set_title("virtual HER2 IHC")
    axes[2].imshow(he.mean(-1), cmap="gray", vmin=0, vmax=255)
    im = axes[2].imshow(np.ma.masked_invalid(heat_img), cmap="YlOrBr", vmin=0, vmax=len(names) - 1, alpha=0.8)
    axes[2].set_title(f"expected HER2 level per tile (slide: {summary['predicted_level']})")
    cb = fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02, ticks=range(len(names)))
    cb.ax.set_yticklabels(names)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(args.label)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(json.dumps({"figure": args.out, "wall_seconds": round(wall, 2), "tiles": summary["tiles"],
                      "tiles_per_second": summary["tiles_per_second"], "output_size": summary["output_size"],
                      "predicted_level": summary["predicted_level"]}, indent=1))


if __name__ == "__main__":
    main()
