"""What a Table-1 benchmark runs: :class:`BenchmarkSpec`, and each model's config under the shared budget.

A model's config is ``base ⊕ (preset(model) − paper) ⊕ --set overrides``
(:func:`derestainer.core.presets.compose_model_config`), then the budget every model shares (steps,
batch size, resolution, seed) and the run folder (:func:`run_config`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derestainer.core.config import Config, from_dict, to_dict
from derestainer.core.errors import BenchmarkError, ConfigError
from derestainer.core.io import list_images
from derestainer.core.presets import MODEL_ALIASES, compose_model_config, split_target
from derestainer.core.presets import preset_delta as _preset_delta

#: Model names that stand for a preset of another name.
ALIASES: dict[str, str] = MODEL_ALIASES

__all__ = ["ALIASES", "BenchmarkSpec", "check_layout", "model_config", "needs_comparator", "preset_delta",
           "run_config", "run_dir", "slug", "split_target"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to benchmark and with which shared budget.

    Attributes:
        data: dataset root in the BCI layout (``HE/{train,test}``, ``IHC/{train,test}``).
        models: model names: presets (``derestainer`` = ``paper``), or YAML files.
        steps: training steps for every model.
        out: output folder (runs, classifiers, results).
        size, batch_size: training resolution and batch size for every model (None: the base config's).
        seeds: one full run per model and seed.
        base_config: preset whose widths, data and training settings every model starts from.
        comparator, evaluator: classifier checkpoints; None → trained here once.
        overrides: ``section.key=value`` applied to every model last; ``MODEL:section.key=value`` to one.
        classifier_arch, classifier_steps, classifier_size: for classifiers trained here.
        comparator_arch: architecture of a comparator trained here (None: ``classifier_arch``); a
            small one makes every step of a model with ``L_cmp`` cheaper (the comparator runs in each).
        device: ``auto`` | ``cpu`` | ``cuda``.
        eval_workers: processes for the per-image evaluation (None: all cores).
        reference: the model every other is compared with, image by image (None: ``derestainer`` when
            benchmarked, else the first model).
        floors: also score the floor rows (no training: :data:`derestainer.evaluation.floors.FLOOR_KINDS`).
        bootstrap: resamples for the intervals and paired differences.
        parallel_evaluator: when the evaluator is to be trained here (none given, none to reuse),
            train it in a second process beside the first generator training, on a quarter of the
            threads (at least one; off below two threads): on CPU a small generator gains little from
            its second core (docs/benchmarks.md, "How the demo's recipe was chosen"). The numbers can
            differ in the last digits from a sequential run, as between machines (other thread counts
            sum in another order).
    """

    data: Path
    models: tuple[str, ...]
    steps: int
    out: Path
    size: int | None = None
    batch_size: int | None = None
    seeds: tuple[int, ...] = (0,)
    base_config: str = "tiny"
    comparator: Path | None = None
    evaluator: Path | None = None
    overrides: tuple[str, ...] = ()
    classifier_arch: str = "resnet18"
    classifier_steps: int = 1000
    classifier_size: int | None = None
    comparator_arch: str | None = None
    device: str = "auto"
    eval_workers: int | None = None
    reference: str | None = None
    floors: bool = True
    bootstrap: int = 2000
    parallel_evaluator: bool = False

    @property
    def reference_model(self) -> str:
        """The model the paired differences are taken against."""
        if self.reference is not None:
            return self.reference
        return "derestainer" if "derestainer" in self.models else self.models[0]


@contextmanager
def _as_benchmark_error() -> Iterator[None]:
    """A config problem of the benchmark is reported as :class:`BenchmarkError` (same message)."""
    try:
        yield
    except ConfigError as exc:
        raise BenchmarkError(str(exc)) from None


def preset_delta(model: str) -> dict[str, dict[str, Any]]:
    """:func:`derestainer.core.presets.preset_delta`, errors as :class:`BenchmarkError`.

    >>> preset_delta("no_dab")
    {'loss': {'dab': 0.0}}
    """
    with _as_benchmark_error():
        return _preset_delta(model)


def model_config(model: str, base: str = "tiny", overrides: Sequence[str] = ()) -> Config:
    """:func:`derestainer.core.presets.compose_model_config`, errors as :class:`BenchmarkError`."""
    with _as_benchmark_error():
        return compose_model_config(model, base, overrides)


def slug(name: str) -> str:
    """A model's run-folder name: the stem of a YAML file, or the preset name, made path-safe."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", Path(name).stem if name.endswith((".yaml", ".yml")) else name)


def run_dir(spec: BenchmarkSpec, model: str, seed: int) -> Path:
    """Folder of one (model, seed) run: ``OUT/runs/<slug>/seed<N>``."""
    return spec.out / "runs" / slug(model) / f"seed{seed}"


def needs_comparator(cfg: Config) -> bool:
    """Whether the loss uses the comparator (``L_cmp`` with non-zero weight)."""
    return cfg.loss.content > 0 and cfg.loss.cmp > 0


def run_config(spec: BenchmarkSpec, model: str, seed: int, run_dir: Path, comparator: Path | None) -> Config:
    """:func:`model_config` plus the shared budget, the data root, the seed and the run folder."""
    cfg = model_config(model, spec.base_config, spec.overrides)
    d = to_dict(cfg)
    d["data"]["root"] = str(spec.data)
    d["data"]["layout"] = "bci"
    if spec.size is not None:
        d["data"]["size"] = int(spec.size)
    d["train"]["steps"] = int(spec.steps)
    if spec.batch_size is not None:
        d["train"]["batch_size"] = int(spec.batch_size)
    d["train"]["seed"] = int(seed)
    d["train"]["device"] = spec.device
    d["train"]["out"] = str(run_dir / "train")
    # A benchmark wants the final model, not a history: samples and validation at the end only
    # (the test split is evaluated properly afterwards), a few checkpoints so that a killed run resumes.
    d["train"]["sample_every"] = int(spec.steps)
    d["train"]["val_every"] = int(spec.steps)
    d["train"]["ckpt_every"] = max(1, int(spec.steps) // 4)
    d["train"]["keep_last"] = 1
    d["train"]["val_max"] = 32
    d["train"]["comparator"] = str(comparator) if (comparator is not None and needs_comparator(from_dict(d))) else ""
    out: Config = from_dict(d)
    return out


def check_layout(root: Path) -> dict[str, Path]:
    """The four BCI folders of ``root``; a clear error when one is missing or empty."""
    dirs = {f"{k}_{s}": root / k.upper() / s for k in ("he", "ihc") for s in ("train", "test")}
    for d in dirs.values():
        if not d.is_dir():
            raise BenchmarkError(
                f"{d}: missing. The benchmark needs the BCI layout HE/{{train,test}} and IHC/{{train,test}} "
                "(make a synthetic set with `derestainer synth`)"
            )
        if not list_images(d):
            raise BenchmarkError(f"{d}: no images")
    he = {p.name for p in list_images(dirs["he_test"])}
    ihc = {p.name for p in list_images(dirs["ihc_test"])}
    if he != ihc:
        odd = sorted(he ^ ihc)[:5]
        raise BenchmarkError(f"{root}: HE/test and IHC/test do not hold the same file names (e.g. {odd})")
    return dirs
