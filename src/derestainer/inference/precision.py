"""The precision rule of inference: what ``auto``, ``fp32`` and ``bf16`` mean, in one place.

Two paths run a generator, and ``auto`` resolves differently on them (docs/performance.md):

- the fast path (:class:`~derestainer.inference.optimize.InferenceModel`) fixes its precision when
  it is built: :func:`default_precision` — bf16 on CUDA and on CPUs with native bf16 dot products,
  else fp32; stain separation stays fp32 inside it;
- a plain model runs under :func:`autocast_context` at :func:`plain_precision` — bf16 autocast on
  CUDA (the whole model, stain separation included), fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, cast, get_args

import torch

#: A precision as asked for.
Precision = Literal["auto", "fp32", "bf16"]
#: A precision as it runs.
ResolvedPrecision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

#: Whether ``precision="auto"`` may pick bf16 autocast on CPU for the fast path: only on CPUs with
#: native bf16 dot products (:func:`native_cpu_bf16`). Measured on the 2-core AMD EPYC (Zen 5,
#: avx512_bf16) of docs/performance.md: bf16 about 2x the fp32 fast path for DeReStainer, whose fp32
#: convolutions already run near the core's fp32 peak. Without such instructions oneDNN emulates
#: bf16 by conversions and fp32 is the faster choice.
CPU_AUTO_BF16 = True


def check_precision(precision: str) -> Precision:
    """``precision`` itself when it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: anything else.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return cast(Precision, precision)


def native_cpu_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def default_precision(device: torch.device | str) -> ResolvedPrecision:
    """``precision="auto"`` of the fast path resolved: ``bf16`` on CUDA and on CPUs with native bf16
    (:func:`native_cpu_bf16`, if :data:`CPU_AUTO_BF16`), else ``fp32``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16"
    if dev.type == "cpu" and CPU_AUTO_BF16 and native_cpu_bf16():
        return "bf16"
    return "fp32"


def fast_precision(device: torch.device | str, precision: Precision = "auto") -> ResolvedPrecision:
    """The precision the fast path is built to run at: ``precision``, or :func:`default_precision` for ``auto``."""
    return default_precision(device) if precision == "auto" else precision


def plain_precision(device: torch.device, precision: Precision = "auto") -> ResolvedPrecision:
    """The precision a plain model runs at under :func:`autocast_context`: ``auto`` is bf16 on CUDA, else fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return "bf16"
    return "fp32"


def bf16_autocast(device_type: str, precision: ResolvedPrecision) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on ``device_type`` when ``precision`` is ``bf16``; nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_context(device: torch.device, precision: Precision = "auto") -> contextlib.AbstractContextManager[Any]:
    """The autocast a plain model runs under: bf16 on CUDA (``auto``/``bf16``) or anywhere with ``bf16``."""
    return bf16_autocast(device.type, plain_precision(device, precision))


__all__ = [
    "CPU_AUTO_BF16", "PRECISIONS", "Precision", "ResolvedPrecision", "autocast_context", "bf16_autocast",
    "check_precision", "default_precision", "fast_precision", "native_cpu_bf16", "plain_precision",
]
