"""Training speed: one optimizer step of :class:`~derestainer.training.loop.Trainer` per timed call.

``eager`` is the trainer with ``amp=off``, ``channels_last=False`` and grouped modulated
convolutions; ``optimized`` is the trainer as configured for the device (bf16 and channels_last on
CUDA) with ``fused="auto"`` modulated convolutions. The data is a SynthBCI folder written for the
run (or ``spec.data``); where each step's batch comes from is :mod:`derestainer.speed.loader`'s job.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from derestainer.core.config import Config, replace
from derestainer.core.errors import BenchError
from derestainer.data.synth import generate_dataset
from derestainer.models.classifier import ARCHS, HER2Classifier, save_classifier
from derestainer.speed.loader import loaders_of, step_functions
from derestainer.speed.spec import BenchSpec, PathName
from derestainer.speed.timing import count_flops, forward_flops, path_entries, time_paths
from derestainer.training.loop import Trainer

Log = Callable[[str], None]


def _synth_folder(spec: BenchSpec, n_pairs: int, tmp: Path, log: Log) -> Path:
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
    if c in ARCHS:
        torch.manual_seed(spec.seed)
        path = tmp / f"comparator_{c}.safetensors"
        save_classifier(path, HER2Classifier(arch=c), {"size": spec.size, "seed": spec.seed, "note": "random init (bench)"})
        return str(path)
    if not Path(c).is_file():
        raise BenchError(f"--comparator {c!r}: not one of none, {', '.join(ARCHS)} and not a file")
    return c


def _train_cfg(spec: BenchSpec, cfg: Config, path: PathName, data_root: Path, out: Path, comparator: str) -> Config:
    fast = path == "optimized"
    data: dict[str, Any] = {"root": str(data_root), "layout": "bci", "size": spec.size, "crop": 0, "cache": spec.cache,
                            "train_split": "train", "val_split": "test"}
    if spec.workers is not None:
        data["workers"] = int(spec.workers)
    train: dict[str, Any] = {"out": str(out), "batch_size": spec.batch, "grad_accum": 1, "device": str(spec.device),
                             "tensorboard": "off", "sample_every": 0, "ckpt_every": 0, "val_every": 0, "log_every": 10**9,
                             "sample_count": 0, "comparator": comparator, "seed": spec.seed}
    if not fast:
        train.update(amp="off", channels_last=False)
    return replace(cfg, data=data, train=train)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    lg = logging.getLogger(logger)
    before = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(before)


def _trainers(spec: BenchSpec, cfg: Config, data_root: Path, tmp: Path, comparator: str
              ) -> tuple[dict[str, Trainer], dict[str, dict[str, Any]]]:
    """One trainer per path of ``spec.paths`` (same seed, same data) and each one's options."""
    trainers: dict[str, Trainer] = {}
    options: dict[str, dict[str, Any]] = {}
    for path in spec.paths:
        tcfg = _train_cfg(spec, cfg, path, data_root, tmp / f"run_{path}", comparator)
        torch.manual_seed(spec.seed)
        with _quiet("derestainer.train"):  # its warnings (no comparator, no validation) become notes
            tr = Trainer(tcfg)
        set_fused = getattr(tr.generator, "set_fused_modconv", None)
        if callable(set_fused):  # eager: the grouped form, whatever the default
            set_fused("auto" if path == "optimized" else True)
        trainers[path] = tr
        options[path] = {"amp": str(tr.amp_dtype).replace("torch.", "") if tr.amp_dtype else "off",
                         "channels_last": bool(tr.channels_last),
                         "modconv": "auto" if path == "optimized" else "fused",
                         "workers": tcfg.data.workers, "cache": tcfg.data.cache,
                         "comparator": spec.comparator, "active_losses": sorted(tr.active)}
    return trainers, options


def _time_steps(spec: BenchSpec, trainers: dict[str, Trainer], options: dict[str, dict[str, Any]],
                device: torch.device) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Time every (path, loader) step; also the FLOPs of the very first warm-up step (or None)."""
    fns, opts = step_functions(trainers, spec.loader, spec.batch, device, options)
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
            tr.close()
    return path_entries(t, opts), next(iter(step_flops.values()), None)


def bench_train(spec: BenchSpec, cfg: Config, device: torch.device, log: Log) -> dict[str, Any]:
    """Time training steps of ``spec.paths`` with ``spec.loader``; FLOPs of a forward and of a whole step.

    Raises:
        BenchError: the data holds fewer pairs than one batch, or the comparator is unknown.
    """
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="derestainer-bench-") as tmpdir:
        tmp = Path(tmpdir)
        steps = spec.warmup + spec.iters
        # one epoch covers every disk-loaded step, so that no epoch boundary (worker start-up) is timed
        n_pairs = spec.batch * (steps + 1) if "disk" in loaders_of(spec.loader) else spec.batch
        data_root = Path(spec.data) if spec.data else _synth_folder(spec, n_pairs, tmp, log)
        trainers, options = _trainers(spec, cfg, data_root, tmp, _comparator_file(spec, tmp))
        first = trainers[spec.paths[0]]
        n_items = len(first.train_set)
        if n_items < spec.batch:
            raise BenchError(f"{data_root}: {n_items} training pairs, fewer than --batch {spec.batch}")
        paths, step = _time_steps(spec, trainers, options, device)
        gen = first.generator
        flops = forward_flops(gen, spec.size)
        params = sum(p.numel() for p in gen.parameters()) / 1e6
        if "cmp" not in first.active:
            notes.append("L_cmp off (no comparator; pass --comparator resnet50 to include its cost)")
        if spec.data is None:
            notes.append(f"data: SynthBCI, {n_pairs} pairs at {spec.source_size or spec.size} px, written for this run")
        del trainers, first, gen
    return {
        "gflops_per_image": flops / 1e9,
        "train_step_gflops_per_image": step / 1e9 / spec.batch if step is not None else None,
        "params_m": params,
        "paths": paths,
        "notes": notes,
    }
