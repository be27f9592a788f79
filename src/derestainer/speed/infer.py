"""Inference speed: one batch ``[B, 3, S, S]`` through the generator, the eager and/or the optimised path."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from derestainer.core.config import Config
from derestainer.core.errors import BenchError
from derestainer.core.ranges import unit_to_signed
from derestainer.inference.optimize import FastPathOptions, InferenceModel, eager_model, optimize_for_inference
from derestainer.models.registry import create_generator
from derestainer.speed.spec import BenchSpec
from derestainer.speed.timing import forward_flops, path_entries, time_paths


def randomize_bn_stats(model: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial running statistics (as after training), so that folding is real work."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def bench_infer(spec: BenchSpec, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Time ``spec.paths`` on one random input batch (already on ``device``); FLOPs of one forward.

    Raises:
        BenchError: ``spec.size`` is not a multiple of what the generator needs.
    """
    model = create_generator(cfg.model).eval()
    multiple = int(getattr(model, "size_multiple", 0) or 2 ** int(cfg.model.n_down))
    if spec.size % multiple:
        raise BenchError(f"--size {spec.size} must be a multiple of {multiple} for {cfg.model.name}")
    randomize_bn_stats(model)
    flops = forward_flops(model, spec.size)
    unit = torch.rand(spec.batch, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(spec.seed))
    x = unit_to_signed(unit).to(device)
    fast_opts = FastPathOptions(**spec.fast)
    nets: dict[str, InferenceModel] = {}
    options: dict[str, dict[str, Any]] = {}
    for name in spec.paths:
        if name == "eager":
            nets[name] = eager_model(model, device)
        else:
            nets[name] = optimize_for_inference(model, device, fast_opts)
        options[name] = {**nets[name].options.to_dict(), "precision": nets[name].precision}
    del model
    t = time_paths({name: partial(net, x) for name, net in nets.items()}, device, spec.warmup, spec.iters)
    notes = []
    if any(o.get("compile") for o in options.values()):
        notes.append("torch.compile time is in the warm-up, not in the timed rounds")
    return {
        "gflops_per_image": flops / 1e9,
        "params_m": sum(p.numel() for p in nets[spec.paths[0]].model.parameters()) / 1e6,
        "paths": path_entries(t, options),
        "notes": notes,
    }
