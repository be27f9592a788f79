"""Speed measurement (``derestainer bench``): throughput, memory and FLOPs of a generator, for inference or training.

Not to be confused with :mod:`derestainer.benchmark` (``derestainer benchmark``: the paper's Table 1,
quality metrics). docs/performance.md has the results and the commands.

What is measured:

- **infer** (:mod:`.infer`): one batch ``[B, 3, S, S]`` through the generator, input already on the
  device; the plain eager fp32 path (:func:`~derestainer.inference.optimize.eager_model`:
  ``no_grad``, NCHW, BatchNorm, the model as built) and/or the fast path
  (:func:`~derestainer.inference.optimize.optimize_for_inference`).
- **train** (:mod:`.train`): one optimizer step of :class:`~derestainer.training.loop.Trainer` (its
  public ``train_step``: generator, discriminator, losses, backward, AdamW) on a SynthBCI folder in
  the BCI layout, with the batch either held in memory (``loader=memory``: uint8 tensors decoded
  once) or read by a DataLoader over the real dataset each step (``loader=disk``; :mod:`.loader`).
  ``eager`` is the trainer with ``amp=off``, ``channels_last=False`` and grouped modulated
  convolutions; ``optimized`` is the trainer as configured for the device (bf16 and channels_last on
  CUDA) with ``fused="auto"`` modulated convolutions.

Method (:mod:`.timing`): ``warmup`` untimed calls per path, then ``iters`` rounds; in each round
every path runs once, in an order rotated by one each round, so that slow drifts of a shared machine
hit all paths alike. A round's time covers the whole call, with a device synchronisation before and
after. Reported per path: images/s (median, quartiles, min, max over the rounds), tiles/s (infer:
images counted in tiles of ``tile`` px), megapixels/s, and peak memory (CUDA:
``max_memory_allocated`` over the path's rounds; CPU on Linux: the process's peak resident set
``VmHWM`` over the path's rounds, reset before each call through ``/proc/self/clear_refs``;
elsewhere the lifetime peak ``ru_maxrss``). Ratios between paths: the ratio of the medians and the
median of the per-round ratios (both measured in the same run). GFLOPs per image:
``torch.utils.flop_counter`` on the generator's forward (a copy on the ``meta`` device: no compute),
and for training the whole step (counted during the first warm-up step).

:func:`run_bench` (:mod:`.run`) returns the result; :mod:`.report` prints it and tabulates many.
"""

from __future__ import annotations

from derestainer.speed.report import format_result, summary_table
from derestainer.speed.run import device_name, run_bench
from derestainer.speed.spec import (
    LOADERS,
    MODES,
    PATH_KEYS,
    PATHS,
    RESULT_KEYS,
    SCHEMA,
    SUMMARY_KEYS,
    BenchMode,
    BenchSpec,
    LoaderMode,
    PathName,
    resolve_config,
)
from derestainer.speed.timing import MemoryMeter, Timings, count_flops, forward_flops, summarize, time_paths

__all__ = [
    "LOADERS",
    "MODES",
    "PATHS",
    "PATH_KEYS",
    "RESULT_KEYS",
    "SCHEMA",
    "SUMMARY_KEYS",
    "BenchMode",
    "BenchSpec",
    "LoaderMode",
    "MemoryMeter",
    "PathName",
    "Timings",
    "count_flops",
    "device_name",
    "format_result",
    "forward_flops",
    "resolve_config",
    "run_bench",
    "summarize",
    "summary_table",
    "time_paths",
]
