"""``derestainer demo``: the whole pipeline on the embedded default, SynthBCI, sized for a laptop CPU.

1. generate a small SynthBCI dataset (BCI layout, known HER2 levels);
2. stain separation panels (paper Fig. 1b) for one synthetic H&E and its IHC, and a contact sheet of
   H&E/IHC pairs per HER2 level (paper Fig. 1a);
3. train the HER2 comparator and, separately, the evaluator classifier;
4. train the ``tiny`` DeReStainer, translate the test split and evaluate it (SSIM/PSNR by the BCI
   protocol, top-k/kNN HER2 accuracy, stain-aware metrics), with a contact sheet
   H&E | generated IHC | real IHC per level.

Steps 3–4 are one :func:`derestainer.benchmark.run_benchmark` over the single model ``derestainer``,
so the demo exercises exactly the code a user's benchmark runs. Everything is resumable: running the
demo again reuses what is finished.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derestainer.benchmark import BenchmarkSpec, run_benchmark
from derestainer.core.errors import DatasetError
from derestainer.core.guard import output_lock
from derestainer.core.io import read_image, write_json
from derestainer.core.levels import HER2_LEVELS, parse_bci_level
from derestainer.data.synth import SynthParams, displacement_name, generate_dataset, with_displacement
from derestainer.stain.panels import separate_image
from derestainer.viz import image_grid

#: The metrics the demo prints and keeps in ``demo_summary.json``.
SUMMARY_METRICS: tuple[str, ...] = ("ssim", "psnr", "top1", "top3", "top5", "knn", "dab_od_pearson")
#: The metrics on which the demo states the model's margin over each floor row.
MARGIN_METRICS: tuple[str, ...] = ("ssim", "psnr", "dab_od_pearson")
FLOOR_ROWS: tuple[str, ...] = ("floor-median", "floor-hematoxylin")


#: The demo's training recipe on top of the ``tiny`` preset, chosen by measurement (docs/benchmarks.md,
#: "How the demo's recipe was chosen"): one down-sampling step instead of three (a 64-px field keeps its
#: nuclei at 32 px instead of 8), a 5× higher learning rate with cosine decay.
DEMO_RECIPE: tuple[str, ...] = ("model.n_down=1", "train.lr=1e-3", "train.lr_schedule=cosine")


@dataclass(frozen=True)
class DemoSpec:
    """What the demo runs. SynthBCI images are drawn at about 1 µm per pixel and trained on at their
    own size (no resampling); the pairs are ``registered`` (see :data:`~derestainer.data.synth.DISPLACEMENTS`).
    The evaluator is a ResNet-18, the comparator of ``L_cmp`` the small ``tiny`` CNN: it runs in every
    training step, and a ResNet-18 there makes each step about 3× slower for the same scores. The
    evaluator trains in a second process beside the generator (``parallel_evaluator``): on 2 cores the
    demo's generator is only about 10 % faster on two threads than on one, the evaluator 1.7×."""

    out: Path
    n_train: int = 400
    n_test: int = 80
    image_size: int = 64       # SynthBCI images (the BCI layout's "1024 px" stands here)
    displacement: str = "registered"
    train_size: int = 64       # training resolution (the BCI protocol resizes back to image_size)
    steps: int = 1000
    classifier_steps: int = 150
    classifier_arch: str = "resnet18"
    comparator_arch: str = "tiny"
    recipe: tuple[str, ...] = DEMO_RECIPE
    parallel_evaluator: bool = True
    seed: int = 0
    device: str = "auto"


def _dataset(spec: DemoSpec, data: Path, log: Callable[[str], None]) -> None:
    """[1/4] the SynthBCI dataset: generated, or reused when it was made with the same settings."""
    marker = data / "synthbci.json"
    if marker.is_file():
        _check_reusable(marker, spec)
        log(f"[1/4] SynthBCI: reusing {data}")
    else:
        log(f"[1/4] SynthBCI: {spec.n_train} train + {spec.n_test} test pairs at {spec.image_size} px, seed {spec.seed}, "
            f"{spec.displacement} sections")
        params = with_displacement(SynthParams(), spec.displacement)
        s = generate_dataset(data, spec.n_train, spec.n_test, size=spec.image_size, seed=spec.seed, params=params)
        log(f"      {s['pairs']} pairs in {s['seconds']:.1f} s ({s['pairs_per_s']:.0f} pairs/s)")


def _figures(data: Path, out: Path) -> tuple[Path, Path]:
    """[2/4] stain separation panels of one test pair, and a sheet of one pair per HER2 level."""
    he_test = sorted((data / "HE" / "test").glob("*.png"))
    examples = _one_per_level(he_test)
    stain_dir = out / "stain_separation"
    first = examples[max(examples)]  # the highest level present: it shows DAB best
    separate_image(read_image(first), stain_dir, f"HE_{first.stem}", second="e")
    separate_image(read_image(data / "IHC" / "test" / first.name), stain_dir, f"IHC_{first.stem}", second="dab")
    levels = sorted(examples)
    pairs_sheet = image_grid(
        [[read_image(examples[lv]), read_image(data / "IHC" / "test" / examples[lv].name)] for lv in levels],
        out / "pairs_per_level.png", row_labels=[f"HER2 {HER2_LEVELS[lv]}" for lv in levels],
        col_labels=["H&E", "IHC (adjacent section)"], title="SynthBCI pairs",
    )
    return stain_dir, pairs_sheet


def run_demo(spec: DemoSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo into ``spec.out``; returns a summary with the paths of what it wrote.

    Raises:
        DatasetError: ``spec.out`` holds a SynthBCI dataset made with other settings.
    """
    with output_lock(spec.out, folder=True):  # two demos into one folder would mix their steps
        return _run_demo(spec, log)


def _run_demo(spec: DemoSpec, log: Callable[[str], None]) -> dict[str, Any]:
    out = Path(spec.out)
    data = out / "synthbci"
    _dataset(spec, data, log)
    log("[2/4] stain separation panels and pairs per HER2 level")
    stain_dir, pairs_sheet = _figures(data, out)

    log(f"[3/4] classifiers, then [4/4] the tiny DeReStainer ({spec.steps} steps at {spec.train_size} px), "
        "translation of the test split and evaluation")
    # SynthBCI draws about 1 µm per pixel (at zoom 1); the model sees it resized to train_size, and
    # the exported model must carry that physical resolution so that whole slides are resampled right.
    mpp = round(SynthParams().zoom ** -1 * spec.image_size / spec.train_size, 4)
    bench = BenchmarkSpec(
        data=data, models=("derestainer",), steps=spec.steps, out=out / "run", size=spec.train_size,
        seeds=(spec.seed,), base_config="tiny", classifier_arch=spec.classifier_arch, comparator_arch=spec.comparator_arch,
        classifier_steps=spec.classifier_steps, classifier_size=spec.train_size, device=spec.device,
        overrides=(f"data.mpp={mpp}", *spec.recipe), parallel_evaluator=spec.parallel_evaluator,
    )
    results = run_benchmark(bench, log=lambda m: log(f"      {m}"))
    metrics = results["runs"][0].get("metrics", {})
    picked: dict[str, Any] = {k: metrics.get(k) for k in SUMMARY_METRICS}
    summary: dict[str, Any] = {
        "data": str(data),
        "stain_separation": str(stain_dir),
        "pairs_per_level": str(pairs_sheet),
        "translation_sheet": str(out / "run" / "figure.png"),
        "table": str(out / "run" / "table.md"),
        "metrics": picked,
        "margins_over_floors": floor_margins(results),
    }
    write_json(out / "demo_summary.json", summary)
    log("done:")
    for k in ("pairs_per_level", "stain_separation", "translation_sheet", "table"):
        log(f"  {k.replace('_', ' ')}: {summary[k]}")
    log("  " + ", ".join(f"{k} {v:.3f}" for k, v in picked.items() if isinstance(v, (int, float))))
    for floor, by_metric in summary["margins_over_floors"].items():
        log(f"  margin over {floor}: " + ", ".join(
            f"{k} {m['estimate']:+.3f} [{m['ci_low']:+.3f}, {m['ci_high']:+.3f}]" for k, m in by_metric.items()))
    return summary


def floor_margins(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The model's margin over each floor row: model − floor on :data:`MARGIN_METRICS`, from the
    benchmark's paired differences (which are floor − model), with the 95 % interval flipped to match,
    and ``clear`` when the interval lies above 0. Metrics without a finite difference are left out."""
    diffs = (results.get("comparisons") or {}).get("differences") or {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for floor in FLOOR_ROWS:
        for k in MARGIN_METRICS:
            d = (diffs.get(floor) or {}).get(k)
            if not d or not all(isinstance(d.get(f), (int, float)) and math.isfinite(d[f])
                                for f in ("estimate", "ci_low", "ci_high")):
                continue  # e.g. a correlation of a constant image: no margin to state
            lo, hi = -float(d["ci_high"]), -float(d["ci_low"])
            out.setdefault(floor, {})[k] = {"estimate": -float(d["estimate"]), "ci_low": lo, "ci_high": hi,
                                             "clear": lo > 0}
    return out


def _check_reusable(marker: Path, spec: DemoSpec) -> None:
    """Refuse to reuse a SynthBCI folder made with another seed, image size, number of pairs or displacement."""
    try:
        made = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{marker.parent}: unreadable {marker.name} ({exc}); use another --out or delete that folder") from exc
    counts = made.get("counts") or {}

    def n(split: str) -> int | None:
        c = counts.get(split)
        return sum(int(v) for v in c.values()) if isinstance(c, dict) else None

    have = {"seed": made.get("seed"), "size": made.get("size"), "train": n("train"), "test": n("test"),
            "displacement": displacement_name(made.get("params") or {})}
    want = {"seed": spec.seed, "size": spec.image_size, "train": spec.n_train, "test": spec.n_test,
            "displacement": spec.displacement}
    diff = [f"{k} {have[k]} (asked for {want[k]})" for k in want if have[k] != want[k]]
    if diff:
        raise DatasetError(
            f"{marker.parent} holds a SynthBCI dataset made with other settings: {', '.join(diff)}. "
            "Use another --out, or delete that folder to generate it again"
        )


def _one_per_level(files: list[Path]) -> dict[int, Path]:
    chosen: dict[int, Path] = {}
    for f in files:
        chosen.setdefault(parse_bci_level(f.name), f)
    if not chosen:
        raise DatasetError("the demo dataset has no test images")
    return chosen
