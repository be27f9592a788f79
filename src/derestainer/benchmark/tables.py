"""The Table-1 report: the paper's numbers (quoted), the measured table in Markdown, ``table.md``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from derestainer.benchmark.spec import BenchmarkSpec, model_config
from derestainer.benchmark.stats import Summary

#: Paper's Table 1 (Wei et al., DeReStainer), on BCI, as printed: (method, SSIM, PSNR, top-1, top-3, top-5, kNN k=10).
PAPER_TABLE1A: tuple[tuple[str, float, float, float, float, float, float], ...] = (
    ("Pix2PixHD", 0.471, 19.634, 0.276, 0.480, 0.563, 0.278),
    ("PyramidPix2Pix", 0.477, 21.161, 0.335, 0.505, 0.613, 0.330),
    ("Just4Fun", 0.558, 22.929, 0.483, 0.670, 0.779, 0.490),
    ("lifangda02", 0.503, 17.865, 0.368, 0.543, 0.624, 0.353),
    ("DeReStainer (Ours)", 0.564, 20.647, 0.563, 0.726, 0.796, 0.600),
)
PAPER_TABLE1B: tuple[tuple[str, float, float, float, float, float, float], ...] = (
    ("w/o L_stain", 0.559, 20.862, 0.481, 0.696, 0.787, 0.513),
    ("w/o L_DAB", 0.555, 20.141, 0.554, 0.714, 0.788, 0.562),
    ("Full L_stain", 0.564, 20.647, 0.563, 0.726, 0.796, 0.600),
)

#: A table column: (header, metrics key, higher is better).
Column = tuple[str, str, bool]
#: Table 1 columns.
TABLE1_COLUMNS: tuple[Column, ...] = (
    ("SSIM", "ssim", True),
    ("PSNR", "psnr", True),
    ("top-1", "top1", True),
    ("top-3", "top3", True),
    ("top-5", "top5", True),
    ("kNN (k=10)", "knn", True),
)
#: Columns described, not ranked: a high self-match rate means near-copies, not a better HER2 stain.
UNRANKED: frozenset[str] = frozenset({"self_match_rate"})
#: Beyond the paper.
EXTRA_COLUMNS: tuple[Column, ...] = (
    ("top-1 excl. self", "top1_excl_self", True),
    ("kNN excl. self", "knn_excl_self", True),
    ("self-match rate", "self_match_rate", True),
    ("evaluator acc.", "evaluator_accuracy", True),
    ("DAB OD r", "dab_od_pearson", True),
    ("DAB OD MAE", "dab_od_mae", False),
    ("DAB area MAE", "dab_fraction_mae", False),
    ("H OD r", "h_od_pearson", True),
    ("FID", "fid", False),
    ("KID", "kid", False),
)


def _digits(key: str) -> int:
    return 2 if key in ("psnr", "fid") else 3


def _fmt(stat: dict[str, Any] | None, key: str, ci: dict[str, Any] | None = None) -> str:
    if stat is None or not stat.get("n"):
        return "–"
    digits = _digits(key)
    mu, sd = stat["mean"], stat["std"]
    if not math.isfinite(mu):
        return str(mu)
    s = f"{mu:.{digits}f}"
    if stat["n"] > 1 and math.isfinite(sd):
        s += f" ± {sd:.{digits}f}"
    if ci is not None and math.isfinite(ci["ci_low"]) and math.isfinite(ci["ci_high"]):
        s += f" [{ci['ci_low']:.{digits}f}, {ci['ci_high']:.{digits}f}]"
    return s


def markdown_table(summary: Summary, columns: Sequence[Column], label: str = "Method",
                   intervals: dict[str, dict[str, Any]] | None = None, floors: Sequence[str] = ()) -> str:
    """A Markdown table, one row per model: ``mean ± std over seeds [95 % CI]`` (the interval where
    ``intervals`` has one); the best mean of each column among the trained models (not the ``floors``) in bold."""
    models = list(summary)
    best: dict[str, float] = {}
    for _, key, higher in columns:
        if key in UNRANKED:
            continue
        means = [summary[m][key]["mean"] for m in models
                 if m not in floors and key in summary[m] and math.isfinite(summary[m][key]["mean"])]
        if len(means) > 1:
            best[key] = max(means) if higher else min(means)
    lines = [
        "| " + " | ".join([label] + [h + (" ↑" if hi else " ↓") for h, _, hi in columns]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for m in models:
        cells = [f"{m} (no training)" if m in floors else m]
        for _, key, _hi in columns:
            stat = summary[m].get(key)
            cell = _fmt(stat, key, (intervals or {}).get(m, {}).get(key))
            if stat and m not in floors and key in best and stat["n"] and stat["mean"] == best[key]:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(comparisons: dict[str, Any], columns: Sequence[Column]) -> str:
    """Paired differences from the reference, ``Δ [95 % CI]``, ``*`` where the interval excludes 0; last row:
    the smallest difference this test set and seed count could detect (80 % power, two-sided α 0.05)."""
    ref = comparisons["reference"]
    cols = [c for c in columns if any(c[1] in d for d in comparisons["differences"].values())]
    lines = ["| " + " | ".join([f"Δ vs {ref}"] + [h for h, _, _ in cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    for m, diffs in comparisons["differences"].items():
        cells = [m]
        for _, key, _ in cols:
            d = diffs.get(key)
            if d is None or not all(math.isfinite(d[k]) for k in ("estimate", "ci_low", "ci_high")):
                cells.append("–")
                continue
            k = _digits(key)
            mark = " *" if d["excludes_zero"] else ""
            cells.append(f"{d['estimate']:+.{k}f} [{d['ci_low']:+.{k}f}, {d['ci_high']:+.{k}f}]{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    det = comparisons.get("detectable") or {}
    lines.append("| " + " | ".join(["smallest detectable Δ"]
                                    + [f"{det[key]:.{_digits(key)}f}" if key in det else "–" for _, key, _ in cols]) + " |")
    return "\n".join(lines)


def paper_table() -> str:
    """The paper's Table 1 (a) and (b) as Markdown, headed as the paper's numbers on BCI."""
    head = "| Method (paper, BCI) | SSIM | PSNR | top-1 | top-3 | top-5 | kNN (k=10) |\n|---|---|---|---|---|---|---|"
    rows_a = "\n".join(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |" for r in PAPER_TABLE1A)
    rows_b = "\n".join(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |" for r in PAPER_TABLE1B)
    return (
        "**The paper's numbers** (Wei et al., DeReStainer, Table 1, on the real BCI test set at 1024 px; "
        "quoted for reference, not measured here and not comparable with synthetic-data results):\n\n"
        f"(a) comparison\n\n{head}\n{rows_a}\n\n(b) ablation of the stain loss\n\n{head}\n{rows_b}\n"
    )


def _classifier_lines(classifiers: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for role, info in classifiers.items():
        how = "trained by the benchmark" if info.get("trained_by_benchmark") else "given"
        acc = (info.get("metrics") or {}).get("accuracy")
        detail = ""
        if info.get("trained_by_benchmark"):
            st = info["settings"]
            detail = f" ({st['arch']}, {st['steps']} steps, {st['size']} px, seed {st['seed']}, {st['subset']} training images"
            detail += f", validation accuracy {acc:.3f})" if isinstance(acc, (int, float)) else ")"
        lines.append(f"- {role}: {how}{detail}, sha256 {info['digest']}…")
    return lines


def _comparison_lines(comparisons: dict[str, Any] | None) -> list[str]:
    if not comparisons:
        return []
    if comparisons.get("note") and not comparisons.get("differences"):
        return ["## Paired differences", "", f"Not computed: {comparisons['note']}.", ""]
    b = comparisons["b"]
    return [
        f"## Paired differences from `{comparisons['reference']}`", "",
        (f"Each cell: the difference of the seed-averaged metric from the reference, with its 95 % interval "
         f"(two-level percentile bootstrap, B = {b}: runs and test images resampled together, images paired); "
         "`*` marks an interval that excludes 0. The last row is the smallest difference a comparison of this "
         "size would detect with 80 % power at two-sided α = 0.05 (2.80 × the bootstrap standard error, "
         "median over the trained models): smaller differences in the table cannot be told from noise."),
        "",
        differences_table(comparisons, (*TABLE1_COLUMNS, *EXTRA_COLUMNS)),
        "",
    ]


def format_report(
    summary: Summary, spec: BenchmarkSpec, classifiers: dict[str, dict[str, Any]],
    figure: Path | None = None, runs: Sequence[dict[str, Any]] = (), comparisons: dict[str, Any] | None = None,
) -> str:
    """``table.md``: the measured Table 1 (with intervals), the paired differences, the stain-aware metrics,
    the floors, the setup, and the paper's numbers."""
    seeds = ", ".join(str(s) for s in spec.seeds)
    size = spec.size or model_config("derestainer", spec.base_config).data.size
    batch = spec.batch_size or model_config("derestainer", spec.base_config).train.batch_size
    floors = [r["model"] for r in runs if r.get("floor")]
    intervals = (comparisons or {}).get("intervals")
    lines = [
        f"# Benchmark on `{Path(spec.data).name}`",
        "",
        (f"Same budget for every model: {spec.steps} steps, batch {batch}, {size} px, base config "
         f"`{spec.base_config}`, seeds {seeds}. Values are mean ± sample standard deviation over seeds "
         "(no ± with one seed)"
         + (", then the 95 % confidence interval of the mean over seeds and test images together "
            "(two-level bootstrap)" if intervals else "")
         + "; the best mean per column among the trained models is in bold."),
        "",
    ]
    if floors:
        lines += [("Floor rows (no training): `floor-median` fills every test image with the median colour of the "
                   "training IHC; `floor-hematoxylin` re-renders the H&E's own haematoxylin as an IHC counterstain "
                   "without DAB (docs/evaluation.md, \"Floors\"). A model is only as good as its margin over them."), ""]
    lines += ["## Table 1 layout", "", markdown_table(summary, TABLE1_COLUMNS, intervals=intervals, floors=floors), ""]
    lines += _comparison_lines(comparisons)
    extra = [c for c in EXTRA_COLUMNS if any(c[1] in s for s in summary.values())]
    if extra:
        lines += ["## Stain-aware and other metrics (beyond the paper)", "",
                  markdown_table(summary, extra, intervals=intervals, floors=floors), ""]
    off = sorted({(r["model"], term, why) for r in runs for term, why in (r.get("terms_off") or {}).items()})
    if off:
        lines += ["**Terms asked for but off in these runs**: "
                  + "; ".join(f"`{m}`: `{t}` ({w})" for m, t, w in off) + ".", ""]
    params = {r["model"]: r.get("generator_params") for r in runs}
    if any(v for v in params.values()):
        lines += ["Generator parameters: " + ", ".join(f"{m} {v / 1e6:.3g} M" for m, v in params.items() if v) + ".", ""]
    lines += ["## Classifiers", "", *_classifier_lines(classifiers), ""]
    if figure is not None:
        lines += [f"![one test image per HER2 level: H&E, each method, ground truth]({figure.name})", ""]
    lines += [paper_table()]
    return "\n".join(lines)
