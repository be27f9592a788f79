"""Learning-rate schedules (``train.lr_schedule``, ``train.lr_decay_start``, ``train.warmup_steps`` / ``warmup_fraction``).

The rate of optimizer step ``k`` (0-based: the step that takes ``TrainState.step`` from ``k`` to
``k + 1``) of a run of ``T = train.steps`` steps is ``base · warm(k) · decay(k)``:

* ``warm(k) = min(1, (k + 1) / W)`` for ``W = train.warmup_steps`` when it is > 0, else
  ``W = round(train.warmup_fraction · T)``; ``warm = 1`` when ``W = 0`` (linear from 0);
* ``decay(k) = 1`` before ``S = round(lr_decay_start · T)``; after it, with ``t = (k − S) / (T − S)``,
  ``constant``: 1; ``linear``: ``1 − t``; ``cosine``: ``(1 + cos(π t)) / 2`` (both reach 0 at step T).

pix2pix's “hold for ``n_epochs``, then decay linearly to zero over ``n_epochs_decay``” is
``linear`` with ``lr_decay_start = n_epochs / (n_epochs + n_epochs_decay)``; BCIStainer's “warm up over
50 of 150 epochs, then cosine to 0” is ``cosine`` with ``warmup_fraction = lr_decay_start = 1/3``.

The trainer sets every parameter group's rate from the step count before each step rather than
keeping a ``LambdaLR``: the rate is then a pure function of ``(config, step)``, so a resumed run
follows the schedule exactly with nothing extra in the checkpoint (the optimizer's saved ``lr``
is overwritten at the next step), and the checkpoint format is unchanged.
"""

from __future__ import annotations

import math

import torch

from derestainer.core.config import TrainConfig


def lr_factor(step: int, total: int, schedule: str = "constant", decay_start: float = 0.0, warmup: int = 0) -> float:
    """The multiplier of the base rate for optimizer step ``step`` (0-based) of ``total`` (see the module doc)."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    start = round(decay_start * total)
    if schedule == "constant" or step < start or total <= start:
        return warm
    t = min(1.0, (step - start) / (total - start))
    if schedule == "linear":
        return warm * (1.0 - t)
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def warmup_steps(tc: TrainConfig) -> int:
    """``W``: ``train.warmup_steps`` when > 0, else ``round(train.warmup_fraction · train.steps)``."""
    return tc.warmup_steps if tc.warmup_steps > 0 else round(tc.warmup_fraction * tc.steps)


def base_rates(tc: TrainConfig) -> tuple[float, float]:
    """``(G's, D's)`` base learning rate: ``train.lr`` and ``train.d_lr`` (0 = the same)."""
    return tc.lr, tc.d_lr or tc.lr


def apply_lr(tc: TrainConfig, step: int, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None) -> float:
    """Set G's and D's rates for optimizer step ``step``; returns G's."""
    f = lr_factor(step, tc.steps, tc.lr_schedule, tc.lr_decay_start, warmup_steps(tc))
    lr_g, lr_d = base_rates(tc)
    for opt, base in ((opt_g, lr_g), (opt_d, lr_d)):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = base * f
    return lr_g * f
