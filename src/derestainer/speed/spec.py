"""What a speed measurement runs (:class:`BenchSpec`), the keys of its result, and the model's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from derestainer.core.config import Config, load_config
from derestainer.core.errors import BenchError, ConfigError
from derestainer.core.presets import MODEL_ALIASES, compose_model_config

#: What is timed: one generator forward (``infer``) or one training step (``train``).
BenchMode = Literal["infer", "train"]
#: Training batches: held in memory, read from disk by a DataLoader each step, or both alternating.
LoaderMode = Literal["memory", "disk", "both"]
#: The plain eager fp32 path and/or the optimised one.
PathName = Literal["eager", "optimized"]

MODES: tuple[str, ...] = get_args(BenchMode)
LOADERS: tuple[str, ...] = get_args(LoaderMode)
PATHS: tuple[str, ...] = get_args(PathName)
SCHEMA = "derestainer.bench/1"

#: Keys of every JSON result (documented in docs/performance.md).
RESULT_KEYS: tuple[str, ...] = (
    "schema", "model", "generator", "mode", "size", "batch", "tile", "device", "device_name", "threads",
    "torch", "python", "warmup", "iters", "gflops_per_image", "train_step_gflops_per_image", "params_m", "paths",
    "ratios", "config", "notes", "command", "load_average",
)
#: Keys of each entry of ``paths`` (rates are :func:`~derestainer.speed.timing.summarize` dicts;
#: ``seconds``: one per timed round).
PATH_KEYS: tuple[str, ...] = (
    "images_per_s", "tiles_per_s", "megapixels_per_s", "seconds", "peak_memory_mb", "memory_kind", "options",
    "first_call_s",
)
#: Keys of a :func:`~derestainer.speed.timing.summarize` dict.
SUMMARY_KEYS: tuple[str, ...] = ("median", "q1", "q3", "min", "max")


@dataclass(frozen=True)
class BenchSpec:
    """What to measure.

    Attributes:
        model: a preset (``tiny``, ``paper``, ``pix2pix``, ``pyramidpix2pix``, ...), ``derestainer``
            (= ``paper``) or a YAML file.
        base: width class: None = the preset as it is; ``tiny``/``paper`` = that preset's widths
            with ``model``'s differences from ``paper`` (e.g. pix2pix at tiny widths).
        size, batch: image size (px) and batch size.
        mode: ``infer`` | ``train``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``.
        warmup, iters: untimed and timed calls per path.
        paths: which of ``eager``, ``optimized`` to run (both = ``--compare``).
        tile: tile size for tiles/s (default: ``size``).
        fast: keyword overrides of :class:`~derestainer.inference.optimize.FastPathOptions` (infer).
        loader: train: ``memory`` | ``disk`` | ``both``.
        data: train: a BCI-layout folder to read (default: a SynthBCI folder written to a temp dir).
        source_size: size of the SynthBCI images written (default ``size``; e.g. 1024 to resize
            like BCI's 1024 → 512 pairs).
        workers: DataLoader workers for ``loader=disk`` (default: the config's).
        cache: keep decoded, resized pairs in memory (``data.cache``).
        comparator: train: ``none`` | ``tiny`` | ``resnet18`` | ``resnet50`` (randomly initialised,
            for L_cmp's cost) | a classifier file.
        threads: ``torch.set_num_threads`` (default: as is).
        overrides: ``section.key=value`` config overrides.
        seed: for inputs and weights.
    """

    model: str = "tiny"
    base: str | None = None
    size: int = 256
    batch: int = 1
    mode: BenchMode = "infer"
    device: str = "auto"
    warmup: int = 2
    iters: int = 10
    paths: tuple[PathName, ...] = ("optimized",)
    tile: int | None = None
    fast: dict[str, Any] = field(default_factory=dict)
    loader: LoaderMode = "memory"
    data: str | None = None
    source_size: int | None = None
    workers: int | None = None
    cache: bool = False
    comparator: str = "none"
    threads: int | None = None
    overrides: tuple[str, ...] = ()
    seed: int = 0


def check_spec(spec: BenchSpec) -> None:
    """Reject a spec that cannot be measured, before anything is built.

    Raises:
        BenchError: unknown mode, loader or path; sizes or counts out of range.
    """
    if spec.mode not in MODES:
        raise BenchError(f"mode must be one of {MODES}, got {spec.mode!r}")
    if spec.loader not in LOADERS:
        raise BenchError(f"loader must be one of {LOADERS}, got {spec.loader!r}")
    if spec.size < 8 or spec.batch < 1 or spec.iters < 1 or spec.warmup < 0:
        raise BenchError("need size ≥ 8, batch ≥ 1, iters ≥ 1, warmup ≥ 0")
    if spec.mode == "train" and spec.warmup < 1:
        raise BenchError("train mode needs at least one warm-up step (it counts the step's FLOPs)")
    bad = set(spec.paths) - set(PATHS)
    if bad or not spec.paths:
        raise BenchError(f"paths must be eager and/or optimized, got {spec.paths}")


def resolve_config(spec: BenchSpec) -> Config:
    """The :class:`~derestainer.core.config.Config` of ``spec.model`` (see :class:`BenchSpec`).

    Raises:
        BenchError: unknown model or base, bad override (the message names the model).
    """
    name = MODEL_ALIASES.get(spec.model, spec.model)
    try:
        if spec.base:
            return compose_model_config(spec.model, spec.base, spec.overrides)
        return load_config(name, list(spec.overrides))
    except ConfigError as exc:
        raise BenchError(f"model {spec.model!r}: {exc}") from None
