#!/usr/bin/env python
"""Figure for docs/inference.md: a real H&E slide beside its virtual IHC and HER2 map, all in the slide's pixels.

Runs ``derestainer translate-slide``'s library path on a real slide with a trained model (native
geometry: the virtual IHC at the slide's own level-0 size), then draws the H&E at level 0, the
virtual IHC read back from the written OME-TIFF, and the expected HER2 level read back from the
registered probability map (``NAME.her2.ome.tiff``) placed by its physical pixel size: three views
of the same pixel coordinates, as QuPath shows them. Prints the timing line recorded in the docs.

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
                    help="crop (level-0 pixels) to show; default: the whole slide")
    ap.add_argument("--label", default="model trained on SynthBCI (synthetic data)",
                    help="what the model is, printed in the figure")
    args = ap.parse_args()

    # imported after parsing, so that --help answers without loading matplotlib and torch
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile

    from derestainer.inference import SlideOptions, load_model, translate_slide
    from derestainer.inference.slides import open_slide

    lm = load_model(args.checkpoint, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slide.ome.tiff"
        t0 = time.perf_counter()
        summary = translate_slide(lm, args.slide, out, SlideOptions(
            tile=args.tile, overlap=args.overlap, slide_mpp=args.mpp, compression="lossless", progress=False,
            geometry="native"))
        wall = time.perf_counter() - t0
        with tifffile.TiffFile(out) as tf:
            ihc = tf.series[0].levels[0].asarray()
        with tifffile.TiffFile(out.parent / "slide.her2.ome.tiff") as tf:
            her2 = tf.series[0].asarray()  # [p(0)..p(3+), expected level] × cells
            image = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
            cell_um = float((image[0] if isinstance(image, list) else image)["Pixels"]["PhysicalSizeX"])
    names = list(summary["levels"])
    with open_slide(args.slide) as reader:
        w0, h0 = reader.dimensions
        he = reader.read_level(0, 0, 0, w0, h0)
    # the map's cells placed on level-0 pixels by their physical size (how a viewer overlays it)
    per_cell = cell_um / summary["slide_mpp"]
    iy = np.minimum((np.arange(h0) / per_cell).astype(int), her2.shape[1] - 1)
    ix = np.minimum((np.arange(w0) / per_cell).astype(int), her2.shape[2] - 1)
    heat_full = her2[-1][iy[:, None], ix[None, :]]
    x, y, w, h = args.region or (0, 0, w0, h0)
    he, ihc, heat_img = he[y:y + h, x:x + w], ihc[y:y + h, x:x + w], heat_full[y:y + h, x:x + w]
    assert he.shape == ihc.shape, (he.shape, ihc.shape)  # native geometry: the same pixels

    fig, axes = plt.subplots(1, 3, figsize=(13, 13 / 3 * h / w + 1.2), dpi=72)
    axes[0].imshow(he)
    axes[0].set_title(f"H&E, level 0 ({summary['slide_mpp']:g} µm/px)")
    axes[1].imshow(ihc)
    axes[1].set_title("virtual HER2 IHC, same pixels")
    axes[2].imshow(he.mean(-1), cmap="gray", vmin=0, vmax=255)
    im = axes[2].imshow(np.ma.masked_invalid(heat_img), cmap="YlOrBr", vmin=0, vmax=len(names) - 1, alpha=0.8)
    axes[2].set_title(f"expected HER2 level per tile (slide call: {summary['predicted_level']})")
    cb = fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02, ticks=range(len(names)))
    cb.ax.set_yticklabels(names)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{Path(args.slide).name}: {args.label} (model at {lm.mpp:g} µm/px) — virtual stain, not a real IHC")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    from PIL import Image

    with Image.open(args.out) as im:  # a 256-colour palette PNG: the figure at a fraction of the bytes
        im.convert("RGB").quantize(256).save(args.out, optimize=True)
    print(json.dumps({"figure": args.out, "wall_seconds": round(wall, 2), "tiles": summary["tiles"],
                      "tiles_per_second": summary["tiles_per_second"], "output_size": summary["output_size"],
                      "predicted_level": summary["predicted_level"]}, indent=1))


if __name__ == "__main__":
    main()
