"""An exponential moving average of the generator's weights (``train.ema``; BCIStainer trains with one).

BCIStainer uses ``ema_pytorch.EMA(G, beta=0.99, update_after_step=100, update_every=1, power=1.0)``:
the average copies G for the first ``update_after_step`` steps, then follows
``θ̄ ← d·θ̄ + (1 − d)·θ`` with a decay that warms up, ``d_k = min(beta, 1 − (1 + k)^−power)`` for the
``k``-th update after that (``k = 0`` first: ``d = 0``, a copy). The same rule here, with
``beta = train.ema``, ``update_after_step = train.ema_start`` and ``power = 1``. Floating-point buffers
(BatchNorm running statistics) are averaged with the same decay and integer ones (batch counters)
copied, as ema_pytorch 0.0.10 (the version BCIStainer pins) does.

The average is what validation scores and what the run's ``generator.safetensors`` holds; checkpoints
keep both (``generator.safetensors`` the trained weights, ``generator_ema.safetensors`` the average).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

#: ema_pytorch's default warm-up exponent, as BCIStainer uses it.
EMA_POWER = 1.0


def ema_decay(step: int, beta: float, start: int, power: float = EMA_POWER) -> float:
    """The decay used at optimizer step ``step`` (1-based, after the update): 0 (a copy) up to ``start + 1``."""
    k = step - start - 1
    if k <= 0:
        return 0.0
    return min(beta, 1.0 - (1.0 + k) ** -power)


class GeneratorEMA:
    """A frozen copy of a generator whose weights follow the moving average.

    Args:
        model: the (unwrapped) generator; copied at construction.
        beta: the final decay (``train.ema``), in ``(0, 1)``.
        start: optimizer steps before the average starts (``train.ema_start``).
    """

    def __init__(self, model: nn.Module, beta: float, start: int = 0) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"train.ema must be in (0, 1) (or 0 for off), got {beta}")
        if start < 0:
            raise ValueError(f"train.ema_start must be ≥ 0, got {start}")
        self.beta, self.start = beta, start
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, skipped: torch.Tensor | None = None) -> None:
        """Fold ``model``'s weights in after optimizer step ``step``; nothing changes where ``skipped`` is true
        (a 0-dim bool tensor: the step was skipped for a non-finite loss, read on the device)."""
        d = ema_decay(step, self.beta, self.start)
        for avg, p in zip(self.module.parameters(), model.parameters()):
            new = avg * d + p.detach() * (1.0 - d) if d > 0 else p.detach()
            avg.copy_(new if skipped is None else torch.where(skipped, avg, new))
        for avg_b, b in zip(self.module.buffers(), model.buffers()):
            new_b = avg_b * d + b * (1.0 - d) if d > 0 and b.is_floating_point() else b
            avg_b.copy_(new_b if skipped is None else torch.where(skipped, avg_b, new_b))
