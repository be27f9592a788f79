#!/usr/bin/env python
"""Calibrate SynthBCI's colours against real images, and draw the figures of docs/synthbci.md.

Measure (see ``derestainer.data.synth_calibration``): the median CIELAB colour of tissue pixels
per image, summarised over a set of images by the median of the per-image medians, compared by
CIEDE2000 ΔE00:
  * H&E tissue: synthetic H&E (all levels) vs the real H&E tiles (``REAL/he/*``);
  * IHC DAB-positive and DAB-negative tissue: synthetic IHC vs the real IHC image
    (``REAL/ihc/skimage_ihc.png``); whole IHC tissue is reported too (it depends on the staining
    pattern, which is not HER2's in the real image, so it is not a calibration target).

Usage (from the repository root):
    python scripts/calibrate_synth.py [--real DIR] [--n 40] [--size 256] [--seed 0]
                                      [--figures docs/figures] [--json FILE]
The real-data folder defaults to $DERESTAINER_REAL_DATA, else ../shared/data/real beside the repo.
Prints a Markdown table; writes synthbci_calibration.png, synthbci_levels.png and
synthbci_layers.png into --figures.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np

from derestainer.core.io import list_images, read_image, write_bytes, write_json
from derestainer.data import synth_calibration as C
from derestainer.data.synth import level_name, render_pair
from derestainer.stain import stain_concentration_np

REPO = Path(__file__).resolve().parents[1]


def default_real() -> Path:
    env = os.environ.get("DERESTAINER_REAL_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "real"


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(size, h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return img[y:y + s, x:x + s]


def fmt_lab(lab: np.ndarray | None) -> str:
    return "—" if lab is None else "(" + ", ".join(f"{v:.1f}" for v in lab) + ")"


def measure(real: Path, n: int, size: int, seed: int) -> tuple[dict, list]:
    real_he_imgs = [read_image(p) for p in list_images(real / "he")]
    real_ihc_imgs = [read_image(real / "ihc" / "skimage_ihc.png")]
    pairs = [render_pair((seed, i), i % 4, size) for i in range(n)]
    he = [p[0] for p in pairs]
    ihc = [p[1] for p in pairs]
    ihc3 = [p[1] for p in pairs if p[2]["level"] == 3]
    rows = []

    def row(name: str, synth: dict, ref: dict, target: bool) -> None:
        rows.append({
            "measure": name, "target": target,
            "synthetic_lab": None if synth["lab"] is None else [float(v) for v in synth["lab"]],
            "synthetic_rgb": synth["rgb"], "n_synthetic": synth["n"],
            "real_lab": [float(v) for v in ref["lab"]], "real_rgb": ref["rgb"], "n_real": ref["n"],
            "delta_e00": None if synth["lab"] is None else C.delta_e(synth["lab"], ref["lab"]),
        })

    real_he = C.summarise(real_he_imgs)
    row("H&E tissue (all levels)", C.summarise(he), real_he, True)
    row("IHC DAB-positive tissue (3+)", C.summarise(ihc3, "dab+"), C.summarise(real_ihc_imgs, "dab+"), True)
    row("IHC DAB-negative tissue (all levels)", C.summarise(ihc, "dab-"), C.summarise(real_ihc_imgs, "dab-"), True)
    row("IHC tissue (3+)", C.summarise(ihc3), C.summarise(real_ihc_imgs), False)
    spread = [C.delta_e(v, real_he["lab"]) for v in real_he["per_image"] if v is not None]
    dab_frac = {level_name(lvl): float(np.mean([C.dab_positive_mask(p[1]).mean() for p in pairs if p[2]["level"] == lvl]))
                for lvl in range(4)}
    dab_od = {level_name(lvl): float(np.mean([stain_concentration_np(p[1], "dab").mean() for p in pairs if p[2]["level"] == lvl]))
              for lvl in range(4)}
    cue = {}
    for lvl in range(4):
        sel = [p for p in pairs if p[2]["level"] == lvl]
        cue[level_name(lvl)] = {
            "nuclear_pixel_fraction": float(np.mean([(stain_concentration_np(p[0], "h") > 0.06).mean() for p in sel])),
            "tumour_fraction": float(np.mean([p[2]["tumour_fraction"] for p in sel])),
            "nucleus_radius_px": float(np.mean([p[2]["nucleus_radius"] for p in sel])),
            "positive_cell_fraction": float(np.mean([p[2]["positive_fraction"] for p in sel])),
        }
    report = {
        "n_synthetic": n, "size": size, "seed": seed,
        "per_level": cue,
        "rows": rows,
        "real_he_tiles": [p.name for p in list_images(real / "he")],
        "real_he_spread_delta_e00": {"min": min(spread), "median": float(np.median(spread)), "max": max(spread)},
        "synthetic_dab_positive_fraction": dab_frac,
        "real_ihc_dab_positive_fraction": float(C.dab_positive_mask(real_ihc_imgs[0]).mean()),
        "synthetic_mean_dab_ruifrok": dab_od,
        "real_ihc_mean_dab_ruifrok": float(stain_concentration_np(real_ihc_imgs[0], "dab").mean()),
    }
    return report, [real_he_imgs, real_ihc_imgs, pairs]


def markdown(report: dict) -> str:
    lines = ["| measure | synthetic Lab (sRGB) | real Lab (sRGB) | ΔE00 |", "|---|---|---|---|"]
    for r in report["rows"]:
        name = r["measure"] + ("" if r["target"] else " — not a target")
        de = "—" if r["delta_e00"] is None else f"{r['delta_e00']:.1f}"
        lines.append(f"| {name} | {fmt_lab(r['synthetic_lab'])} {tuple(r['synthetic_rgb'] or ())} | "
                     f"{fmt_lab(r['real_lab'])} {tuple(r['real_rgb'])} | {de} |")
    s = report["real_he_spread_delta_e00"]
    lines.append("")
    lines.append(f"Real H&E tiles around their own median: ΔE00 min {s['min']:.1f}, median {s['median']:.1f}, max {s['max']:.1f}.")
    lines.append("DAB-positive tissue fraction per level (synthetic): " + ", ".join(
        f"{k}: {v:.3f}" for k, v in report["synthetic_dab_positive_fraction"].items())
        + f"; real IHC image: {report['real_ihc_dab_positive_fraction']:.3f}.")
    lines.append("Mean Ruifrok DAB concentration per level (synthetic): " + ", ".join(
        f"{k}: {v:.4f}" for k, v in report["synthetic_mean_dab_ruifrok"].items())
        + f"; real IHC image: {report['real_ihc_mean_dab_ruifrok']:.4f}.")
    lines.append("")
    lines.append("| level | nuclear pixels (Ruifrok H > 0.06) | tumour fraction | mean nucleus radius (px) | HER2-stained tumour cells |")
    lines.append("|---|---|---|---|---|")
    for k, v in report["per_level"].items():
        lines.append(f"| {k} | {v['nuclear_pixel_fraction']:.3f} | {v['tumour_fraction']:.2f} | "
                     f"{v['nucleus_radius_px']:.2f} | {v['positive_cell_fraction']:.0%} |")
    return "\n".join(lines)


def save_small_png(fig, path: Path, colours: int = 160) -> None:
    """Save a matplotlib figure as a palette PNG (histology keeps well in a few hundred colours; < 300 KB)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    im = Image.open(buf).convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    im.save(out, format="PNG", optimize=True)
    write_bytes(path, out.getvalue())


def _panel(ax, img, title: str) -> None:
    ax.imshow(img, interpolation="nearest" if img.ndim == 3 else "bilinear",
              cmap=None if img.ndim == 3 else "magma")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def figure_calibration(real_he, real_ihc, pairs, report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_level = {lvl: [p for p in pairs if p[2]["level"] == lvl] for lvl in range(4)}
    fig, axes = plt.subplots(3, 5, figsize=(10, 6.4), dpi=100)
    picks = [0, 2, 5, 7]  # high-nuclei, medium, tiatoolbox, torchstain: a spread of real tiles
    for j, k in enumerate(picks):
        _panel(axes[0, j], centre_crop(real_he[k % len(real_he)], 256), f"real H&E {j + 1}")
    for j in range(4):
        _panel(axes[1, j], by_level[j][0][0], f"SynthBCI H&E, {level_name(j)}")
    ihc = real_ihc[0]
    _panel(axes[2, 0], ihc[:256, :256], "real IHC (FHL2)")
    _panel(axes[2, 1], ihc[256:, 256:], "real IHC (FHL2)")
    _panel(axes[2, 2], by_level[2][0][1], "SynthBCI IHC, 2+")
    _panel(axes[2, 3], by_level[3][0][1], "SynthBCI IHC, 3+")
    # Swatches of the measured median colours.
    for i, r in enumerate(report["rows"][:3]):
        ax = axes[i, 4]
        sw = np.zeros((40, 80, 3), np.uint8)
        sw[:, :40] = r["synthetic_rgb"]
        sw[:, 40:] = r["real_rgb"]
        ax.imshow(sw)
        ax.set_title(f"{r['measure'].split(' (')[0]}\nsynthetic | real, ΔE00 {r['delta_e00']:.1f}", fontsize=7)
        ax.axis("off")
    fig.suptitle("SynthBCI vs real images: tiles and median tissue colours", fontsize=10)
    fig.tight_layout()
    save_small_png(fig, path)
    plt.close(fig)


def figure_levels(seed: int, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 6, figsize=(9.0, 6.4), dpi=100)
    for lvl in range(4):
        for k in range(3):
            he, ihc, info = render_pair((seed, 1000 + 4 * k + lvl), lvl, size)
            _panel(axes[lvl, 2 * k], he, f"H&E {level_name(lvl)} ({info['architecture']})")
            _panel(axes[lvl, 2 * k + 1], ihc, f"IHC {level_name(lvl)}, {info['positive_fraction']:.0%} cells +")
    fig.suptitle("SynthBCI pairs per HER2 level (rows 0, 1+, 2+, 3+; IHC is the adjacent section)", fontsize=10)
    fig.tight_layout()
    save_small_png(fig, path)
    plt.close(fig)


def figure_layers(seed: int, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from scipy import ndimage as ndi

    he, ihc, info = render_pair((seed, 7), 3, size, return_maps=True)
    m = info["maps"]
    fig, axes = plt.subplots(2, 5, figsize=(11, 5.6), dpi=100)
    cmap = ListedColormap(["white", "#e8a0b8", "#6a3d9a", "#cfe8ff", "#ffe9a8"])
    axes[0, 0].imshow(m["tissue"], cmap=cmap, vmin=0, vmax=4, interpolation="nearest")
    axes[0, 0].set_title("tissue: glass, stroma, tumour,\nlumen, fat", fontsize=8)
    axes[0, 0].axis("off")
    _panel(axes[0, 1], m["he_concentration"][0], "H&E: haematoxylin OD")
    _panel(axes[0, 2], m["he_concentration"][1], "H&E: eosin OD")
    _panel(axes[0, 3], he, "H&E (Beer–Lambert + scan)")
    # Displacement: H of the H&E (magenta) over H of the IHC (green), raw and after undoing the flow.
    h_he, h_ihc = m["he_concentration"][0], m["ihc_concentration"][0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    flow = info["flow"]
    h_he_aligned = ndi.map_coordinates(h_he, [yy + flow[0], xx + flow[1]], order=1, mode="nearest")

    def overlay(a, b):
        a = np.clip(a / (np.percentile(a, 99.5) + 1e-6), 0, 1)
        b = np.clip(b / (np.percentile(b, 99.5) + 1e-6), 0, 1)
        return np.stack([a, b, a], axis=-1)

    _panel(axes[0, 4], overlay(h_he, h_ihc), f"H: H&E (magenta) vs IHC (green)\nshift {info['shift'][0]:+.1f},{info['shift'][1]:+.1f} px, rot {info['rotation_deg']:+.1f}°")
    _panel(axes[1, 0], np.hypot(flow[0], flow[1]), f"|displacement| (max {np.hypot(flow[0], flow[1]).max():.1f} px)")
    _panel(axes[1, 1], m["ihc_concentration"][0], "IHC: haematoxylin OD (lighter)")
    _panel(axes[1, 2], m["ihc_concentration"][2], "IHC: DAB OD (HER2 3+ membranes)")
    _panel(axes[1, 3], ihc, "IHC (Beer–Lambert + scan)")
    _panel(axes[1, 4], overlay(h_he_aligned, h_ihc), "H after undoing the known flow")
    fig.suptitle("How a SynthBCI pair is made (HER2 3+)", fontsize=10)
    fig.tight_layout()
    save_small_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=default_real(), help="folder with he/ and ihc/skimage_ihc.png")
    ap.add_argument("--n", type=int, default=40, help="synthetic pairs to measure (levels cycle 0..3)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figures", type=Path, default=REPO / "docs" / "figures", help="where the PNGs go ('' to skip)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    if not (args.real / "he").is_dir() or not (args.real / "ihc" / "skimage_ihc.png").is_file():
        print(f"error: {args.real} has no he/ folder or ihc/skimage_ihc.png; pass --real DIR", file=sys.stderr)
        return 2
    report, (real_he, real_ihc, pairs) = measure(args.real, args.n, args.size, args.seed)
    print(markdown(report))
    if args.json:
        write_json(args.json, report)
    if str(args.figures):
        figure_calibration(real_he, real_ihc, pairs, report, args.figures / "synthbci_calibration.png")
        figure_levels(args.seed, args.size, args.figures / "synthbci_levels.png")
        figure_layers(args.seed, args.size, args.figures / "synthbci_layers.png")
        print(f"\nfigures written to {args.figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
