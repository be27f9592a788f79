"""One optimizer step of the translation trainer: the D / G updates with AMP and gradient accumulation.

See :mod:`derestainer.training.loop` for the scheme and why nothing here synchronises with the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from derestainer.losses import gan_losses, generator_losses
from derestainer.models.classifier import prepare_images
from derestainer.training.distributed import all_reduce_max

if TYPE_CHECKING:
    from derestainer.training.loop import Trainer

#: ``train.amp``: ``auto`` = bf16 autocast on CUDA, none elsewhere; ``bf16``; ``off``.


@contextlib.contextmanager
def requires_grad(module: nn.Module | None, flag: bool) -> Iterator[None]:
    """Temporarily set ``requires_grad`` of every parameter (D frozen while it judges G's output)."""
    if module is None:
        yield
        return
    params = list(module.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)


def make_adamw(params: list[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (CUDA, CPU in recent torch): one kernel per step and
    a ``found_inf`` input that skips the update on the device."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def guarded_step(opt: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``opt.step()`` unless ``bad`` (a 0-dim bool tensor) is true.

    Fused AdamW reads the flag on the device (no sync): its kernel returns early and the step
    counters are decremented back. Other optimizers fall back to reading the flag on the host.
    """
    if opt.defaults.get("fused"):
        opt.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]  # the attribute fused AdamW reads
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
    elif not bool(bad):
        opt.step()


class BufferGuard:
    """Snapshot of a module's floating/integer buffers (BatchNorm statistics), restored on a bad step
    with ``torch.where`` so that no host sync is needed."""

    def __init__(self, module: nn.Module | None) -> None:
        self.buffers = list(module.buffers()) if module is not None else []
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def snapshot(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)

    def restore_if(self, bad: torch.Tensor) -> None:
        for s, b in zip(self.saved, self.buffers):
            b.copy_(torch.where(bad, s, b))


def no_sync(module: nn.Module | None, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync()`` (no gradient all-reduce) for the micro-batches before the last one."""
    enter = getattr(module, "no_sync", None) if skip_sync else None
    return enter() if callable(enter) else contextlib.nullcontext()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an :data:`AmpMode` on ``device`` (None: full precision)."""
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    raise ValueError(f"train.amp must be auto, bf16 or off, got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(
    tr: Trainer, micro_batches: list[dict[str, Any]]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step of ``tr`` over ``micro_batches`` (see :meth:`Trainer.train_step`)."""
    G, D = tr.g_train, tr.d_train
    G.train()
    if D is not None:
        D.train()
    tr.opt_g.zero_grad(set_to_none=True)
    if tr.opt_d is not None:
        tr.opt_d.zero_grad(set_to_none=True)
    tr.g_guard.snapshot()
    tr.d_guard.snapshot()
    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), dtype=torch.bool, device=tr.device)
    need_ihc = "h" in tr.active
    for k, batch in enumerate(micro_batches):
        last = k == n - 1
        he, ihc = tr.to_device(batch["he"]), tr.to_device(batch["ihc"])
        level = batch["level"].to(tr.device, non_blocking=True)
        with no_sync(G, not last), no_sync(D, not last):
            with tr.autocast():
                out = G(he, ihc if need_ihc else None)
            d_fake_g = None
            if D is not None and tr.discriminator is not None:
                with tr.autocast():
                    d_real = D(he, ihc)
                    d_fake = D(he, out.ihc.detach())
                d_loss = gan_losses(tr.cfg.loss.gan_mode)[0](d_real, d_fake)
                (d_loss / n).backward()
                bad = bad | ~torch.isfinite(d_loss)
                sums["d"] = sums["d"] + d_loss.detach() if "d" in sums else d_loss.detach()
                # D judges G's output with frozen weights and without DDP hooks (no D gradients).
                with requires_grad(tr.discriminator, False), tr.autocast():
                    d_fake_g = tr.discriminator(he, out.ihc)
            f_fake = f_real = None
            if tr.comparator is not None:
                # resize in float32 (antialiased resampling has no bf16 kernel), then embed under autocast
                with tr.autocast():
                    f_fake = tr.comparator.features(prepare_images(out.ihc.float(), tr.cmp_size))
                    with torch.no_grad():
                        f_real = tr.comparator.features(prepare_images(ihc.float(), tr.cmp_size))
            total, terms = generator_losses(out, he, ihc, level, d_fake_g, f_fake, f_real, tr.cfg.loss,
                                            tr.rgb_from_hed)
            (total / n).backward()
        bad = bad | ~torch.isfinite(total)
        for name, v in terms.items():
            sums[name] = sums[name] + v if name in sums else v
    bad = all_reduce_max(bad.to(torch.float32), tr.env) > 0  # one rank's NaN poisons the all-reduced grads
    if tr.opt_d is not None:
        guarded_step(tr.opt_d, bad)
    guarded_step(tr.opt_g, bad)
    tr.g_guard.restore_if(bad)
    tr.d_guard.restore_if(bad)
    means = {name: v / n for name, v in sums.items()}
    return means, bad, {name: ~torch.isfinite(v) for name, v in means.items()}
