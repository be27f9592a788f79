"""``run_bench``: one speed measurement from a :class:`~derestainer.speed.spec.BenchSpec` to its JSON result."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

from derestainer.core.config import to_dict
from derestainer.core.device import resolve_device, torch_threads
from derestainer.speed.infer import bench_infer
from derestainer.speed.spec import SCHEMA, BenchSpec, check_spec, resolve_config
from derestainer.speed.timing import summarize
from derestainer.speed.train import bench_train


def device_name(device: torch.device) -> str:
    """The CUDA card's name, or the CPU model and its number of logical CPUs."""
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


def _rates(spec: BenchSpec, raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per path: images/s, tiles/s and megapixels/s (:func:`~derestainer.speed.timing.summarize` dicts), then the rest."""
    tile = spec.tile or spec.size
    pixels = spec.batch * spec.size * spec.size
    paths: dict[str, dict[str, Any]] = {}
    for name, p in raw.items():
        secs = p["seconds"]
        paths[name] = {
            "images_per_s": summarize([spec.batch / s for s in secs]),
            "tiles_per_s": summarize([pixels / (tile * tile) / s for s in secs]),
            "megapixels_per_s": summarize([pixels / 1e6 / s for s in secs]),
            **p,
        }
    return paths


def run_bench(spec: BenchSpec, log: Callable[[str], None] | None = None, command: str | None = None) -> dict[str, Any]:
    """Run the speed measurement described by ``spec``; returns the result (see :data:`~derestainer.speed.spec.RESULT_KEYS`).

    ``command``: the command line that asked for it, recorded in the result.

    Raises:
        BenchError: a spec that cannot be measured (unknown model, bad size, ...).
        DeviceError: ``spec.device`` is not available here.
    """
    check_spec(spec)
    cfg = resolve_config(spec)
    device = resolve_device(spec.device)
    load_before = _loadavg()
    with torch_threads(spec.threads):
        torch.manual_seed(spec.seed)
        if spec.mode == "infer":
            body = bench_infer(spec, cfg, device)
        else:
            body = bench_train(spec, cfg, device, log or (lambda s: None))
    paths = _rates(spec, body.pop("paths"))
    return {
        "schema": SCHEMA,
        "model": spec.model,
        "generator": cfg.model.name,
        "mode": spec.mode,
        "size": spec.size,
        "batch": spec.batch,
        "tile": spec.tile or spec.size,
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
