"""Stain-separation outputs for people: channel images and a Fig. 1b-style panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import write_image
from .matrices import RGB_FROM_HED
from .numpy_ops import macenko_stain_matrix, rgb_to_hed_np, stain_channel_np


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def choose_second_stain(rgb: np.ndarray, rgb_from_hed: np.ndarray | None = None) -> str:
    """'dab' when the image holds more DAB than eosin (an IHC), else 'e' (an H&E)."""
    m = RGB_FROM_HED if rgb_from_hed is None else rgb_from_hed
    hed = rgb_to_hed_np(rgb, np.linalg.inv(m))
    return "dab" if hed[..., 2].mean() > hed[..., 1].mean() else "e"


def separate_image(
    rgb: np.ndarray, out_dir: str | Path, stem: str, second: str = "auto", matrix: str = "ruifrok"
) -> list[Path]:
    """Write ``{stem}_H.png``, ``{stem}_E.png``, ``{stem}_DAB.png`` and ``{stem}_panel.png``.

    Returns the written paths. ``matrix='macenko'`` estimates H and the second stain per image.
    """
    out = Path(out_dir)
    if second == "auto":
        second = choose_second_stain(rgb)
    m = RGB_FROM_HED if matrix == "ruifrok" else macenko_stain_matrix(rgb, second=second)
    chans = {s: to_uint8(stain_channel_np(rgb, s, m)) for s in ("h", "e", "dab")}
    written = [write_image(out / f"{stem}_{s.upper()}.png", chans[s]) for s in ("h", "e", "dab")]
    written.append(save_panel(out / f"{stem}_panel.png", rgb, chans["h"], chans[second], second))
    return written


def save_panel(path: Path, rgb: np.ndarray, h: np.ndarray, other: np.ndarray, other_name: str) -> Path:
    """original | H | E-or-DAB with titles, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=110)
    for ax, img, title in zip(axes, (rgb, h, other), ("original", "H channel", f"{other_name.upper()} channel")):
        ax.imshow(img)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
