"""The optimisation of classifier training: augmentation, learning-rate schedule and the step loop.

- **Light augmentation**, applied on the batch with a seeded generator (so the result does not
  depend on the number of loader workers): random horizontal/vertical flips and 90° rotations and a
  *small* colour jitter (DAB intensity *is* the HER2 signal).
- **AdamW** with linear warm-up then cosine decay to zero; cross-entropy; bf16 autocast and
  channels-last on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from derestainer.core.ranges import signed_to_unit, unit_to_signed
from derestainer.models.classifier import HER2Classifier, prepare_images


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step ``s``: linear warm-up, then cosine to zero."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        t = (s - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def augment_batch(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.05) -> torch.Tensor:
    """Random flips, 90° rotations and small colour jitter, per sample. ``[N,3,S,S]`` in ``[-1,1]`` → same.

    Random numbers come from ``generator`` (on the CPU) so that results are seeded and device-independent.
    Rotations need square images (the training images are resized to ``size × size``).
    """
    n = x.shape[0]
    u = torch.rand(n, 6, generator=generator)
    k = torch.randint(0, 4, (n,), generator=generator)
    dev = x.device
    hflip = (u[:, 0] < 0.5).to(dev).view(n, 1, 1, 1)
    vflip = (u[:, 1] < 0.5).to(dev).view(n, 1, 1, 1)
    x = torch.where(hflip, x.flip(-1), x)
    x = torch.where(vflip, x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        out = x.clone()
        for r in (1, 2, 3):
            sel = (k == r).nonzero().flatten().to(dev)
            if sel.numel():
                out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        x = out
    if jitter > 0:
        b, c, s = (1.0 + jitter * unit_to_signed(u[:, 2:5])).to(dev, x.dtype).unbind(1)
        y = signed_to_unit(x) * b.view(n, 1, 1, 1)
        gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
        m = gray.mean(dim=(2, 3), keepdim=True)
        y = (y - m) * c.view(n, 1, 1, 1) + m
        gray = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2]).unsqueeze(1)
        y = gray + (y - gray) * s.view(n, 1, 1, 1)
        x = unit_to_signed(y.clamp(0.0, 1.0))
    return x


@dataclass
class StepSetup:
    """What the step loop runs: model, batches, optimiser and schedule, and how each batch is treated."""

    model: HER2Classifier
    loader: Iterable[Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    autocast: AbstractContextManager[Any]
    augment_generator: torch.Generator | None  # None: no augmentation
    jitter: float
    lr: float


class _Window:
    """Loss and accuracy kept on the device and read every few steps (one host sync per window).

    The finiteness check happens at the read too (a non-finite loss is sticky).
    """

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.loss: list[torch.Tensor] = []
        self.acc: list[torch.Tensor] = []
        self.first = 0  # index of the window's first step
        self.ema_loss: float | None = None
        self.ema_acc: float | None = None

    def read(self, step: int) -> None:
        if not self.loss:
            return
        losses = torch.stack(self.loss).tolist()  # the one host sync of the window
        accs = torch.stack(self.acc).tolist()
        self.loss, self.acc = [], []
        for i, (lv, acc) in enumerate(zip(losses, accs, strict=True)):
            if not math.isfinite(lv):
                raise FloatingPointError(f"non-finite loss at step {self.first + i}: lower the learning rate (now {self.lr:g})")
            self.ema_loss = lv if self.ema_loss is None else 0.95 * self.ema_loss + 0.05 * lv
            self.ema_acc = acc if self.ema_acc is None else 0.95 * self.ema_acc + 0.05 * acc
        self.first = step


def run_steps(s: StepSetup, steps: int, progress: bool, read_every: int = 10) -> tuple[float | None, float | None]:
    """Train for the batches of ``s.loader`` (``steps`` of them); returns the final EMA loss and training accuracy."""
    use_cuda = s.device.type == "cuda"
    s.model.train()
    win = _Window(s.lr)
    bar = tqdm(total=steps, desc="train-classifier", disable=not progress, dynamic_ncols=True)
    step = 0
    for xb, yb in s.loader:
        x = prepare_images(xb.to(s.device, non_blocking=True))
        y = torch.as_tensor(yb).to(s.device)
        if s.augment_generator is not None:
            x = augment_batch(x, s.augment_generator, s.jitter)
        if use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with s.autocast:
            logits = s.model(x)
        loss = F.cross_entropy(logits.float(), y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        s.scheduler.step()
        step += 1
        win.loss.append(loss.detach())
        win.acc.append((logits.detach().argmax(1) == y).float().mean())
        bar.update(1)
        if step % read_every == 0 or step == steps:
            win.read(step)
            bar.set_postfix(loss=f"{win.ema_loss:.3f}", acc=f"{win.ema_acc:.2f}", lr=f"{s.scheduler.get_last_lr()[0]:.2e}")
    win.read(step)  # (empty unless the loader ended early)
    bar.close()
    s.model.eval()
    return win.ema_loss, win.ema_acc
