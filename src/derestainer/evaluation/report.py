"""Evaluation reports: ``metrics.json`` (machine), ``metrics.md`` (the paper's Table 1 layout), ``per_image.csv``, figures.

Every file is written atomically (:mod:`derestainer.core.io`): a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from derestainer.core.guard import unfinished_until_done
from derestainer.core.io import read_image, write_bytes, write_json, write_text
from derestainer.core.levels import HER2_LEVELS
from derestainer.evaluation.run import EvaluationResult

#: Per-image CSV columns, in order (semantic columns only when an evaluator was given).
CSV_COLUMNS: tuple[str, ...] = (
    "name", "level", "ssim", "psnr",
    "dab_od_pred", "dab_od_gt", "dab_fraction_pred", "dab_fraction_gt",
    "h_od_pred", "h_od_gt", "h_fraction_pred", "h_fraction_gt",
    "pred_level_direct", "gt_level_direct", "knn_level", "top1_neighbour", "top1_similarity",
    "own_gt_nearest", "pair_r", "pair_rank", "pred_size", "gt_size", "pred_file", "gt_file",
)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ci(metrics: dict[str, Any], name: str, digits: int) -> str:
    c = _get(metrics, "uncertainty", "metrics", name)
    if not isinstance(c, dict) or c.get("ci_low") is None or c.get("ci_high") is None:
        return ""
    return f" [{c['ci_low']:.{digits}f}, {c['ci_high']:.{digits}f}]"


def summary_table(metrics: dict[str, Any], method: str = "generated") -> str:
    """One Markdown table: the paper's Table 1 columns (SSIM, PSNR, top-1/3/5, kNN k=10), then the extra
    metrics; each with its 95 % bootstrap interval where ``metrics.json → uncertainty`` has one."""
    sem = metrics.get("semantic") or {}
    k_knn = sem.get("knn_k", 10)
    cols = ["Method", "SSIM", "PSNR", "Top-1", "Top-3", "Top-5", f"kNN (k={k_knn})",
            "Direct acc", "FID", "KID ×10³", "DAB OD r", "DAB OD MAE", "DAB area r", "H OD r"]
    kid = _get(sem, "distribution", "kid", "mean")

    def cell(value: Any, name: str, digits: int = 3) -> str:
        return _fmt(value, digits) + (_ci(metrics, name, digits) if value is not None else "")

    vals = [
        method,
        cell(_get(metrics, "pixel", "ssim", "mean"), "ssim"),
        cell(_get(metrics, "pixel", "psnr", "mean"), "psnr", 2),
        cell(sem.get("top1"), "top1"), cell(sem.get("top3"), "top3"), cell(sem.get("top5"), "top5"),
        cell(sem.get("knn"), "knn"),
        cell(_get(sem, "direct", "accuracy_generated"), "evaluator_accuracy"),
        _fmt(_get(sem, "distribution", "fid"), 2),
        _fmt(kid * 1e3 if kid is not None else None, 2),
        cell(_get(metrics, "stain", "dab_od", "pearson_r"), "dab_od_r"),
        _fmt(_get(metrics, "stain", "dab_od", "mae")),
        cell(_get(metrics, "stain", "dab_fraction", "pearson_r"), "dab_fraction_r"),
        cell(_get(metrics, "stain", "h_od", "pearson_r"), "h_od_r"),
    ]
    return "\n".join([
        "| " + " | ".join(cols) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|",
        "| " + " | ".join(vals) + " |",
    ]) + "\n"


def table_markdown(metrics: dict[str, Any], method: str = "generated") -> str:
    """The Markdown report: :func:`summary_table`, the other self-match variant, per-level tables, warnings."""
    sem = metrics.get("semantic") or {}
    lines = [
        f"# Evaluation of {method} ({metrics.get('n_images')} images)",
        "",
        "Columns SSIM … kNN are the paper's Table 1; the rest are beyond the paper (docs/evaluation.md).",
        "",
        summary_table(metrics, method),
    ]
    unc = metrics.get("uncertainty") or {}
    if unc.get("metrics"):
        lines += [f"In brackets: {unc['confidence']:.0%} confidence intervals, {unc['method']}, B = {unc['b']}, seed {unc['seed']}.", ""]
    rz = _get(metrics, "protocol", "resize") or {}
    if isinstance(rz, dict) and rz:
        lines += [f"Resize: {rz.get('resized')} of {metrics.get('n_images')} prediction(s) resized to the ground truth's size "
                  f"with {rz.get('method')}; prediction sizes {rz.get('pred_sizes')}, ground-truth sizes {rz.get('gt_sizes')}.", ""]
    n_inf = _get(metrics, "pixel", "psnr", "n_inf")
    if n_inf:
        lines += [f"PSNR is the mean over finite values; {n_inf} image(s) are pixel-identical to their ground truth (PSNR inf).", ""]
    if sem.get("top1") is not None:
        other = "exclude_self" if sem.get("self_match") == "include" else "include_self"
        o = sem.get(other) or {}
        lines += [
            (f"Semantic library: {'includes' if sem.get('self_match') == 'include' else 'excludes'} each image's own ground truth "
             f"(kNN ties: {sem.get('tie')}). With it {'excluded' if other == 'exclude_self' else 'included'}: "
             f"top-1 {_fmt(o.get('top1'))}, top-3 {_fmt(o.get('top3'))}, top-5 {_fmt(o.get('top5'))}, kNN {_fmt(o.get('knn'))}."),
            "",
            (f"Self-match rate (the nearest entry of the full library is the image's own ground truth): "
             f"{_fmt(sem.get('self_match_rate'))}{_ci(metrics, 'self_match_rate', 3)}."),
            "",
            f"Evaluator on the ground truth (reference): accuracy {_fmt(_get(sem, 'direct', 'accuracy_ground_truth'))}.",
            "",
        ]
        per = sem.get("per_level") or {}
        if per:
            lines += ["| Level | n | Top-1 | Top-3 | Top-5 | kNN |", "|---|---:|---:|---:|---:|---:|"]
            for lv, d in per.items():
                lines.append(f"| {lv} | {d['n']} | {_fmt(d.get('top1'))} | {_fmt(d.get('top3'))} | {_fmt(d.get('top5'))} | {_fmt(d.get('knn'))} |")
            lines.append("")
    dab = _get(metrics, "stain", "dab_od", "per_level") or {}
    if dab:
        lines += ["| Level | n | DAB OD generated | DAB OD real | DAB area generated | DAB area real |", "|---|---:|---:|---:|---:|---:|"]
        frac = _get(metrics, "stain", "dab_fraction", "per_level") or {}
        for lv, d in dab.items():
            f = frac.get(lv, {})
            lines.append(f"| {lv} | {d['n']} | {_fmt(d['generated'])} | {_fmt(d['real'])} | {_fmt(f.get('generated'))} | {_fmt(f.get('real'))} |")
        lines.append("")
    for w in metrics.get("warnings") or []:
        lines.append(f"- warning: {w}")
    return "\n".join(lines).rstrip() + "\n"


def per_image_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per image, columns :data:`CSV_COLUMNS` (those present); floats with 6 significant digits, inf as ``inf``."""
    present = [c for c in CSV_COLUMNS if any(c in r for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(present)
    for r in rows:
        w.writerow([_csv_value(r.get(c, "")) for c in present])
    return buf.getvalue()


def _csv_value(v: Any) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if math.isnan(v):
            return "nan"
        return f"{v:.6g}"
    return str(v)


def _thumb(path: Path, size: int) -> np.ndarray:
    im = Image.fromarray(read_image(path))
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im)


#: A figure PNG larger than this is re-encoded with a 256-colour palette (noisy tissue thumbnails
#: compress badly; the figures are for looking, the numbers are in the CSV).
MAX_FIGURE_BYTES: int = 300_000


def _savefig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when figures are drawn

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    plt.close(fig)
    data = buf.getvalue()
    if len(data) > MAX_FIGURE_BYTES:
        small = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(small, format="PNG", optimize=True)
        data = small.getvalue()
    return write_bytes(path, data)


def plot_cases(result: EvaluationResult, path: str | Path, n: int = 4, thumb: int = 144) -> Path:
    """Worst and best images by SSIM: columns worst pred | gt | best pred | gt, one case per row."""
    import matplotlib  # slow to import: only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort([r["ssim"] for r in result.rows], kind="stable")
    k = min(n, len(order))
    worst, best = order[:k], order[::-1][:k]
    fig, axes = plt.subplots(k, 4, figsize=(4 * 1.45, k * 1.6 + 0.3), dpi=100, squeeze=False)
    for row in range(k):
        for col, (idx, which) in enumerate([(worst[row], "pred"), (worst[row], "gt"), (best[row], "pred"), (best[row], "gt")]):
            ax = axes[row][col]
            p = result.pairs[int(idx)]
            ax.imshow(_thumb(p.pred if which == "pred" else p.gt, thumb))
            ax.set_xticks([])
            ax.set_yticks([])
            r = result.rows[int(idx)]
            if which == "pred":
                ax.set_title(f"{r['name'][:22]}\nSSIM {r['ssim']:.3f}", fontsize=6)
            else:
                ax.set_title("ground truth", fontsize=6)
    fig.suptitle(f"worst {k} (left) and best {k} (right) by SSIM: generated | ground truth", fontsize=8)
    fig.tight_layout()
    return _savefig(fig, Path(path))


def plot_confusion(metrics: dict[str, Any], path: str | Path) -> Path | None:
    """Per-level confusion matrices: evaluator on ground truth, on generated images, and kNN on generated. None without them."""
    sem = metrics.get("semantic") or {}
    panels = [("evaluator on ground truth", _get(sem, "direct", "confusion_ground_truth")),
              ("evaluator on generated", _get(sem, "direct", "confusion_generated")),
              (f"kNN (k={sem.get('knn_k')}) on generated", sem.get("knn_confusion"))]
    panels = [(t, np.asarray(c)) for t, c in panels if c is not None]
    if not panels:
        return None
    import matplotlib  # slow to import: only when figures are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.1), dpi=100, squeeze=False)
    for ax, (title, cm) in zip(axes[0], panels, strict=False):
        rows = cm.sum(axis=1, keepdims=True)
        frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        names = [HER2_LEVELS[i] if i < len(HER2_LEVELS) else str(i) for i in range(cm.shape[0])]
        ax.set_xticks(range(cm.shape[1]), names, fontsize=7)
        ax.set_yticks(range(cm.shape[0]), names, fontsize=7)
        ax.set_xlabel("predicted level", fontsize=7)
        ax.set_ylabel("true level", fontsize=7)
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set_title(f"{title}\naccuracy {acc:.3f}", fontsize=7)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.6 else "black")
    fig.tight_layout()
    return _savefig(fig, Path(path))


#: Every file :func:`write_report` may write (``metrics.json`` last).
REPORT_FILES: tuple[str, ...] = ("metrics.md", "per_image.csv", "cases_ssim.png", "confusion.png", "metrics.json")


def write_report(result: EvaluationResult, out_dir: str | Path, method: str = "generated", figures: bool = True) -> list[Path]:
    """Write ``metrics.md``, ``per_image.csv``, (optionally) ``cases_ssim.png``, ``confusion.png``, then ``metrics.json``.

    ``metrics.json`` is the record of a complete report: it is removed first and written last
    (:func:`~derestainer.core.guard.unfinished_until_done`), so that a folder never shows the metrics
    of one run beside the tables or figures of another.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [out / "cases_ssim.png", out / "confusion.png"]
    with unfinished_until_done(out / "metrics.json"):
        written = [
            write_text(out / "metrics.md", table_markdown(result.metrics, method)),
            write_text(out / "per_image.csv", per_image_csv(result.rows)),
        ]
        if figures and result.rows:
            written.append(plot_cases(result, out / "cases_ssim.png"))
            cm = plot_confusion(result.metrics, out / "confusion.png")
            if cm is not None:
                written.append(cm)
        for f in stale:  # figures of an earlier report that this one does not replace
            if f not in written:
                f.unlink(missing_ok=True)
        written.insert(0, write_json(out / "metrics.json", {"method": method, **result.metrics}))
    return written
