"""``derestainer bench``: throughput, memory and FLOPs of a generator, for inference or training.

What is measured (docs/performance.md has the results and the commands):

- **infer**: one batch ``[B, 3, S, S]`` through the generator, input already on the device; the
  plain eager fp32 path (:func:`~derestainer.inference.optimize.eager_model`: ``no_grad``, NCHW,
  BatchNorm, the model as built) and/or the fast path
  (:func:`~derestainer.inference.optimize.optimize_for_inference`).
- **train**: one optimizer step of :class:`~derestainer.training.loop.Trainer` (its public
  ``train_step``: generator, discriminator, losses, backward, AdamW) on a SynthBCI folder in the
  BCI layout, with the batch either held in memory (``loader=memory``: uint8 tensors decoded once)
  or read by a DataLoader over the real dataset each step (``loader=disk``). ``eager`` is the
  trainer with ``amp=off``, ``channels_last=False`` and grouped modulated convolutions;
  ``optimized`` is the trainer as configured for the device (bf16 and channels_last on CUDA) with
  ``fused="auto"`` modulated convolutions.

Method: ``warmup`` untimed calls per path, then ``iters`` rounds; in each round every path runs
once, in an order rotated by one each round, so that slow drifts of a shared machine hit all paths
alike. A round's time covers the whole call, with a device synchronisation before and after.
Reported per path: images/s (median, quartiles, min, max over the rounds), tiles/s (infer: images
counted in tiles of ``tile`` px), megapixels/s, and peak memory (CUDA: ``max_memory_allocated``
over the path's rounds; CPU on Linux: the process's peak resident set ``VmHWM`` over the path's
rounds, reset before each call through ``/proc/self/clear_refs``; elsewhere the lifetime peak
``ru_maxrss``). Ratios between paths: the ratio of the medians and the median of the per-round
ratios (both measured in the same run). GFLOPs per image: ``torch.utils.flop_counter`` on the
generator's forward (a copy on the ``meta`` device: no compute), and for training the whole step
(counted during the first warm-up step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MODES = ("infer", "train")
LOADERS = ("memory", "disk", "both")
SCHEMA = "derestainer.bench/1"

#: Keys of every JSON result (documented in docs/performance.md).
RESULT_KEYS: tuple[str, ...] = (
    "schema", "model", "generator", "mode", "size", "batch", "tile", "device", "device_name", "threads",
    "torch", "python", "warmup", "iters", "gflops_per_image", "train_step_gflops_per_image", "params_m", "paths",
    "ratios", "config", "notes", "command", "load_average",
)
#: Keys of each entry of ``paths`` (rates are :func:`summarize` dicts; ``seconds``: one per timed round).
PATH_KEYS: tuple[str, ...] = (
    "images_per_s", "tiles_per_s", "megapixels_per_s", "seconds", "peak_memory_mb", "memory_kind", "options",
    "first_call_s",
)
#: Keys of a :func:`summarize` dict.
SUMMARY_KEYS: tuple[str, ...] = ("median", "q1", "q3", "min", "max")


class BenchError(ValueError):
    """Bad benchmark input: a message for the user."""


@dataclass(frozen=True)
class BenchSpec:
    """What to benchmark.

    Attributes:
        model: a preset (``tiny``, ``paper``, ``pix2pix``, ``pyramidpix2pix``, ...), ``derestainer``
            (= ``paper``) or a YAML file.
        base: width class: None = the preset as it is; ``tiny``/``paper`` = that preset's widths
            with ``model``'s differences from ``paper`` (e.g. pix2pix at tiny widths).
        size, batch: image size (px) and batch size.
        mode: ``infer`` | ``train``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
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
    mode: str = "infer"
    device: str = "auto"
    warmup: int = 2
    iters: int = 10
    paths: tuple[str, ...] = ("optimized",)
    tile: int | None = None
    fast: dict[str, Any] = field(default_factory=dict)
    loader: str = "memory"
    data: str | None = None
    source_size: int | None = None
    workers: int | None = None
    cache: bool = False
    comparator: str = "none"
    threads: int | None = None
    overrides: tuple[str, ...] = ()
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Small measurement helpers


def summarize(values: list[float]) -> dict[str, float]:
    """Median, quartiles (``statistics.quantiles``, inclusive), min and max of ``values``."""
    if not values:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "min": float("nan"), "max": float("nan")}
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory of a stretch of code: CUDA allocator peak, or the process's peak RSS.

    ``kind`` is ``cuda_max_allocated`` (bytes allocated by tensors on the device, per path),
    ``cpu_peak_rss`` (Linux ``VmHWM``, reset before each call: the process's whole resident set,
    weights of every model in the process included) or ``cpu_lifetime_peak_rss`` (``ru_maxrss``:
    cannot be reset, so it is the process's peak so far).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif self._can_reset():
            self.kind = "cpu_peak_rss"
        else:
            self.kind = "cpu_lifetime_peak_rss"

    @staticmethod
    def _can_reset() -> bool:
        if _proc_status_kb("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss":
            return (_proc_status_kb("VmHWM") or 0) / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    """What :func:`time_paths` measured, per path name.

    Attributes:
        seconds: one duration per timed round.
        peak_mb: peak memory over the path's calls (warm-up included), see :class:`MemoryMeter`.
        memory_kind: :attr:`MemoryMeter.kind`.
        first_call_s: the first warm-up call (includes one-off costs: torch.compile, oneDNN primitive creation).
    """

    seconds: dict[str, list[float]]
    peak_mb: dict[str, float]
    memory_kind: str
    first_call_s: dict[str, float]


def time_paths(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    iters: int,
    first_warmup: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> Timings:
    """Warm up every path, then ``iters`` rounds running every path once, order rotated each round.

    Args:
        fns: path name → zero-argument callable doing one unit of work.
        first_warmup: called as ``first_warmup(name, fn)`` instead of ``fn()`` for the very first
            warm-up call of each path (e.g. to count its FLOPs).
    """
    meter = MemoryMeter(device)
    names = list(fns)
    peaks = {n: 0.0 for n in names}
    first = {n: float("nan") for n in names}
    for n in names:
        for i in range(warmup):
            meter.reset()
            t0 = time.perf_counter()
            if i == 0 and first_warmup is not None:
                first_warmup(n, fns[n])
            else:
                fns[n]()
            _sync(device)
            if i == 0:
                first[n] = time.perf_counter() - t0
            peaks[n] = max(peaks[n], meter.peak_mb())
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(iters):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            _sync(device)
            meter.reset()
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
            peaks[n] = max(peaks[n], meter.peak_mb())
    return Timings(times, peaks, meter.kind, first)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def forward_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one ``[1, 3, size, size]`` forward of ``model``, run on a ``meta`` copy (no compute)."""
    m = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad():
        return count_flops(lambda: m(torch.empty(1, 3, size, size, device="meta")))


# --------------------------------------------------------------------------------------------------
# Config and device


def resolve_config(spec: BenchSpec) -> Any:
    """The :class:`~derestainer.config.Config` of ``spec.model`` (see :class:`BenchSpec`)."""
    from .benchmark import ALIASES, BenchmarkError, model_config
    from .config import ConfigError, load_config

    name = ALIASES.get(spec.model, spec.model)
    try:
        if spec.base:
            return model_config(spec.model, spec.base, spec.overrides)
        return load_config(name, list(spec.overrides))
    except (ConfigError, BenchmarkError) as exc:
        raise BenchError(f"model {spec.model!r}: {exc}") from None


def pick_device(device: str) -> torch.device:
    """:func:`derestainer.inference.patches.pick_device` (the same choice as inference), errors as :class:`BenchError`."""
    from .inference.patches import pick_device as pick

    try:
        dev = pick(device)
    except RuntimeError as exc:  # no CUDA, or a device string torch does not know
        raise BenchError(str(exc)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():  # e.g. "cuda:1" on a machine without CUDA
        raise BenchError(f"--device {device} was asked for, but CUDA is not available")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def _check_spec(spec: BenchSpec) -> None:
    if spec.mode not in MODES:
        raise BenchError(f"mode must be one of {MODES}, got {spec.mode!r}")
    if spec.loader not in LOADERS:
        raise BenchError(f"loader must be one of {LOADERS}, got {spec.loader!r}")
    if spec.size < 8 or spec.batch < 1 or spec.iters < 1 or spec.warmup < 0:
        raise BenchError("need size ≥ 8, batch ≥ 1, iters ≥ 1, warmup ≥ 0")
    if spec.mode == "train" and spec.warmup < 1:
        raise BenchError("train mode needs at least one warm-up step (it counts the step's FLOPs)")
    bad = set(spec.paths) - {"eager", "optimized"}
    if bad or not spec.paths:
        raise BenchError(f"paths must be eager and/or optimized, got {spec.paths}")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# The benchmark


def run_bench(spec: BenchSpec, log: Callable[[str], None] | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``spec``; returns the result (see :data:`RESULT_KEYS`).

    ``command``: the command line that asked for it, recorded in the result.
    """
    _check_spec(spec)
    cfg = resolve_config(spec)
    device = pick_device(spec.device)
    load_before = _loadavg()
    with _threads(spec.threads):
        torch.manual_seed(spec.seed)
        if spec.mode == "infer":
            body = _bench_infer(spec, cfg, device)
        else:
            body = _bench_train(spec, cfg, device, log or (lambda s: None))
    from .config import to_dict

    tile = spec.tile or spec.size
    pixels = spec.batch * spec.size * spec.size
    paths: dict[str, dict[str, Any]] = {}
    for name, p in body.pop("paths").items():
        secs = p["seconds"]
        paths[name] = {
            "images_per_s": summarize([spec.batch / s for s in secs]),
            "tiles_per_s": summarize([pixels / (tile * tile) / s for s in secs]),
            "megapixels_per_s": summarize([pixels / 1e6 / s for s in secs]),
            **p,
        }
    return {
        "schema": SCHEMA,
        "model": spec.model,
        "generator": cfg.model.name,
        "mode": spec.mode,
        "size": spec.size,
        "batch": spec.batch,
        "tile": tile,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads() if spec.threads is None else int(spec.threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "warmup": spec.warmup,
        "iters": spec.iters,
        "gflops_per_image": body["gflops_per_image"],
        "train_step_gflops_per_image": body.get("train_step_gflops_per_image"),
        "params_m": body["params_m"],
        "paths": paths,
        "ratios": _ratios(paths),
        "config": to_dict(cfg),
        "notes": body["notes"],
        "command": command,
        "load_average": [load_before, _loadavg()],
    }


def _loadavg() -> float | None:
    """The 1-minute load average (other processes competing for the cores), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _ratios(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``a/b`` speed ratios for the pairs of paths worth comparing (each measured in the same rounds)."""
    pairs = [("optimized", "eager"), ("optimized+memory", "eager+memory"), ("optimized+disk", "eager+disk"),
             ("eager+memory", "eager+disk"), ("optimized+memory", "optimized+disk")]
    out: dict[str, dict[str, float]] = {}
    for a, b in pairs:
        if a in paths and b in paths:
            ta, tb = paths[a]["seconds"], paths[b]["seconds"]
            out[f"{a}/{b}"] = {
                "speedup_of_medians": statistics.median(tb) / statistics.median(ta),
                "speedup_paired_median": statistics.median([y / x for x, y in zip(ta, tb)]),
            }
    return out


def _bench_infer(spec: BenchSpec, cfg: Any, device: torch.device) -> dict[str, Any]:
    from .inference.optimize import FastPathOptions, eager_model, optimize_for_inference
    from .models.registry import create_generator

    model = create_generator(cfg.model).eval()
    multiple = int(getattr(model, "size_multiple", 0) or 2 ** int(cfg.model.n_down))
    if spec.size % multiple:
        raise BenchError(f"--size {spec.size} must be a multiple of {multiple} for {cfg.model.name}")
    _randomize_bn_stats(model)
    flops = forward_flops(model, spec.size)
    x = (torch.rand(spec.batch, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(spec.seed)) * 2 - 1).to(device)
    fast_opts = FastPathOptions(**spec.fast)
    nets: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for name in spec.paths:
        if name == "eager":
            nets[name] = eager_model(model, device)
        else:
            nets[name] = optimize_for_inference(model, device, fast_opts)
        options[name] = {**nets[name].options.to_dict(), "precision": nets[name].precision}
    del model
    fns = {name: (lambda net=net: net(x)) for name, net in nets.items()}
    t = time_paths(fns, device, spec.warmup, spec.iters)
    notes = []
    if any(o.get("compile") for o in options.values()):
        notes.append("torch.compile time is in the warm-up, not in the timed rounds")
    return {
        "gflops_per_image": flops / 1e9,
        "params_m": sum(p.numel() for p in nets[spec.paths[0]].model.parameters()) / 1e6,
        "paths": _path_entries(t, options),
        "notes": notes,
    }


def _path_entries(t: Timings, options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: {"seconds": t.seconds[n], "peak_memory_mb": t.peak_mb[n], "memory_kind": t.memory_kind,
                "options": options[n], "first_call_s": t.first_call_s[n]} for n in t.seconds}


def _randomize_bn_stats(model: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial running statistics (as after training), so that folding is real work."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# ------------------------------------------------------------------------------------------- train


def _synth_folder(spec: BenchSpec, n_pairs: int, tmp: Path, log: Callable[[str], None]) -> Path:
    from .data.synth import generate_dataset

    size = spec.source_size or spec.size
    root = tmp / "synthbci"
    t0 = time.perf_counter()
    generate_dataset(root, n_train=n_pairs, n_test=0, size=size, seed=spec.seed)
    log(f"wrote {n_pairs} SynthBCI pairs at {size} px in {time.perf_counter() - t0:.1f} s")
    return root


def _comparator_file(spec: BenchSpec, tmp: Path) -> str:
    """``train.comparator`` for ``spec.comparator``: '' (none), a randomly initialised classifier, or the file."""
    c = spec.comparator
    if c in ("", "none"):
        return ""
    from .models.classifier import ARCHS, HER2Classifier, save_classifier

    if c in ARCHS:
        torch.manual_seed(spec.seed)
        path = tmp / f"comparator_{c}.safetensors"
        save_classifier(path, HER2Classifier(arch=c), {"size": spec.size, "seed": spec.seed, "note": "random init (bench)"})
        return str(path)
    if not Path(c).is_file():
        raise BenchError(f"--comparator {c!r}: not one of none, {', '.join(ARCHS)} and not a file")
    return c


def _train_cfg(spec: BenchSpec, cfg: Any, path: str, data_root: Path, out: Path, comparator: str) -> Any:
    from .config import replace

    fast = path == "optimized"
    data = {"root": str(data_root), "layout": "bci", "size": spec.size, "crop": 0, "cache": spec.cache,
            "train_split": "train", "val_split": "test"}
    if spec.workers is not None:
        data["workers"] = int(spec.workers)
    train = {"out": str(out), "batch_size": spec.batch, "grad_accum": 1, "device": str(spec.device),
             "tensorboard": "off", "sample_every": 0, "ckpt_every": 0, "val_every": 0, "log_every": 10**9,
             "sample_count": 0, "comparator": comparator, "seed": spec.seed}
    if not fast:
        train.update(amp="off", channels_last=False)
    return replace(cfg, data=data, train=train)


def _bench_train(spec: BenchSpec, cfg: Any, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from .training.loop import Trainer

    loaders = ("memory", "disk") if spec.loader == "both" else (spec.loader,)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="derestainer-bench-") as tmpdir:
        tmp = Path(tmpdir)
        steps = spec.warmup + spec.iters
        # one epoch covers every disk-loaded step, so that no epoch boundary (worker start-up) is timed
        n_pairs = spec.batch * (steps + 1) if "disk" in loaders else spec.batch
        data_root = Path(spec.data) if spec.data else _synth_folder(spec, n_pairs, tmp, log)
        comparator = _comparator_file(spec, tmp)
        trainers: dict[str, Trainer] = {}
        options: dict[str, dict[str, Any]] = {}
        for path in spec.paths:
            tcfg = _train_cfg(spec, cfg, path, data_root, tmp / f"run_{path}", comparator)
            torch.manual_seed(spec.seed)
            with _quiet("derestainer.train"):  # its warnings (no comparator, no validation) become notes
                tr = Trainer(tcfg)
            if hasattr(tr.generator, "set_fused_modconv"):  # eager: the grouped form, whatever the default
                tr.generator.set_fused_modconv("auto" if path == "optimized" else True)
            trainers[path] = tr
            options[path] = {"amp": str(tr.amp_dtype).replace("torch.", "") if tr.amp_dtype else "off",
                             "channels_last": bool(tr.channels_last),
                             "modconv": "auto" if path == "optimized" else "fused",
                             "workers": tcfg.data.workers, "cache": tcfg.data.cache,
                             "comparator": spec.comparator, "active_losses": sorted(tr.active)}
        first = trainers[spec.paths[0]]
        n_items = len(first.train_set)
        if n_items < spec.batch:
            raise BenchError(f"{data_root}: {n_items} training pairs, fewer than --batch {spec.batch}")
        # the in-memory batch: the dataset's first items, decoded once
        items = [first.train_set[(0, i)] for i in range(spec.batch)]
        mem_batch = {"he": torch.stack([it["he"] for it in items]), "ihc": torch.stack([it["ihc"] for it in items]),
                     "level": torch.tensor([it["level"] for it in items])}
        fns: dict[str, Callable[[], Any]] = {}
        iters: dict[str, Iterator[Any]] = {}
        for path, tr in trainers.items():
            for ld in loaders:
                name = f"{path}+{ld}" if len(loaders) > 1 or spec.loader != "memory" else path
                if ld == "memory":
                    fns[name] = lambda tr=tr: tr.train_step([mem_batch])
                else:
                    tr.sampler.set_epoch(0)
                    dl = DataLoader(tr.train_set, batch_size=spec.batch, sampler=tr.sampler, drop_last=True,
                                    num_workers=tr.cfg.data.workers, pin_memory=device.type == "cuda",
                                    persistent_workers=tr.cfg.data.workers > 0)
                    iters[name] = _forever(dl)
                    fns[name] = lambda tr=tr, it=iters[name]: tr.train_step([next(it)])
                options[name] = {**options[path], "loader": ld}
        step_flops: dict[str, int] = {}

        def first_warmup(name: str, fn: Callable[[], Any]) -> None:
            if not step_flops:
                step_flops[name] = count_flops(fn)
            else:
                fn()

        try:
            t = time_paths(fns, device, spec.warmup, spec.iters, first_warmup=first_warmup)
        finally:
            for tr in trainers.values():
                if tr.logger is not None:
                    tr.logger.close()
        gen = first.generator
        flops = forward_flops(gen, spec.size)
        params = sum(p.numel() for p in gen.parameters()) / 1e6
        if "cmp" not in first.active:
            notes.append("L_cmp off (no comparator; pass --comparator resnet50 to include its cost)")
        if spec.data is None:
            notes.append(f"data: SynthBCI, {n_pairs} pairs at {spec.source_size or spec.size} px, written for this run")
        del trainers, iters, fns
    step = next(iter(step_flops.values()), None)
    return {
        "gflops_per_image": flops / 1e9,
        "train_step_gflops_per_image": step / 1e9 / spec.batch if step is not None else None,
        "params_m": params,
        "paths": _path_entries(t, options),
        "notes": notes,
    }


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    import logging

    lg = logging.getLogger(logger)
    before = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(before)


def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


# --------------------------------------------------------------------------------------------------
# Report


def format_result(res: dict[str, Any]) -> str:
    """A human-readable summary of :func:`run_bench`'s result."""
    lines = [
        (f"derestainer bench: {res['model']} ({res['generator']}), {res['mode']}, {res['size']} px, batch {res['batch']}, "
         f"{res['device']} [{res['device_name']}, {res['threads']} threads], torch {res['torch']}"),
        f"GFLOPs/image (forward): {res['gflops_per_image']:.2f}"
        + (f"; training step: {res['train_step_gflops_per_image']:.2f}" if res.get("train_step_gflops_per_image") else "")
        + f"; parameters: {res['params_m']:.2f} M; {res['warmup']} warm-up + {res['iters']} timed rounds",
    ]
    unit = "tiles/s" if res["mode"] == "infer" else "steps/s"
    head = f"{'path':<20} {'images/s median [q1–q3] (min–max)':<40} {unit:>10} {'MP/s':>8} {'peak MB':>9}"
    lines.append(head)
    for name, p in res["paths"].items():
        ips = p["images_per_s"]
        other = p["tiles_per_s"]["median"] if res["mode"] == "infer" else ips["median"] / res["batch"]
        lines.append(
            f"{name:<20} {_fmt(ips['median'])} [{_fmt(ips['q1'])}–{_fmt(ips['q3'])}] ({_fmt(ips['min'])}–{_fmt(ips['max'])})".ljust(61)
            + f" {_fmt(other):>10} {_fmt(p['megapixels_per_s']['median']):>8} {p['peak_memory_mb']:>9.0f}"
        )
    for key, r in res["ratios"].items():
        lines.append(f"ratio {key}: {r['speedup_of_medians']:.2f}x (paired median {r['speedup_paired_median']:.2f}x)")
    lines.append(f"memory: {res['paths'][next(iter(res['paths']))]['memory_kind']}")
    la = res.get("load_average") or [None, None]
    if la[0] is not None:
        lines.append(f"1-min load average before/after: {la[0]}/{la[1]} (other work on the machine skews CPU timings)")
    for n in res.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def summary_table(files: list[Path] | list[str]) -> str:
    """A Markdown table of bench JSON results: one row per path (docs/performance.md layout)."""
    import json

    rows = ["| model | mode | px | batch | path | images/s median [q1–q3] | ratio vs eager | GFLOPs/img | peak MB | device | command |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        res = json.loads(Path(f).read_text())
        for name, p in res["paths"].items():
            ips = p["images_per_s"]
            base = name.replace("optimized", "eager")
            r = res["ratios"].get(f"{name}/{base}")
            ratio = f"{r['speedup_of_medians']:.2f}x" if r else ("1" if base == name else "")
            rows.append(
                f"| {res['model']} | {res['mode']} | {res['size']} | {res['batch']} | {name} | "
                f"{_fmt(ips['median'])} [{_fmt(ips['q1'])}–{_fmt(ips['q3'])}] | {ratio} | {res['gflops_per_image']:.3g} | "
                f"{p['peak_memory_mb']:.0f} | {res['device_name']} | `{res.get('command') or ''}` |"
            )
    return "\n".join(rows)
