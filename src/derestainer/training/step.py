"""One optimizer step of the translation trainer: the D / G updates with AMP and gradient accumulation.

See :mod:`derestainer.training.loop` for the scheme and why nothing here synchronises with the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from derestainer.losses import gan_d_loss, generator_losses
from derestainer.losses.terms import COMPARATOR, D_FEATURES, IHC_INPUT, VGG
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
    progress = tr.state.step / max(tr.cfg.train.steps, 1)  # before this step: a function of the step
    for k, batch in enumerate(micro_batches):
        he, ihc = tr.to_device(batch["he"]), tr.to_device(batch["ihc"])
        level = batch["level"].to(tr.device, non_blocking=True)
        with no_sync(G, k < n - 1), no_sync(D, k < n - 1):
            with tr.autocast():
                out = G(he, ihc if IHC_INPUT in tr.needs else None)
            extra, d_loss = _adversarial(tr, he, ihc, out.ihc)
            if d_loss is not None:
                (d_loss / n).backward()
                bad = bad | ~torch.isfinite(d_loss)
                sums["d"] = sums["d"] + d_loss.detach() if "d" in sums else d_loss.detach()
            extra.update(_frozen_features(tr, ihc, out.ihc, progress))
            total, terms = generator_losses(out, he, ihc, level, extra.pop("d_fake"), extra.pop("cmp_fake"),
                                            extra.pop("cmp_real"), tr.cfg.loss, tr.rgb_from_hed, progress=progress,
                                            **extra)
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
    if tr.ema is not None:
        tr.ema.update(tr.generator, tr.state.step + 1, bad)
    means = {name: v / n for name, v in sums.items()}
    return means, bad, {name: ~torch.isfinite(v) for name, v in means.items()}


def _adversarial(tr: Trainer, he: torch.Tensor, ihc: torch.Tensor,
                 fake: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The discriminator's loss on this micro-batch (None without D) and what G's GAN terms need:
    ``d_fake`` (D's logits on the generated pair, D frozen) and, for feature matching, the
    intermediate features of both pairs (``d_fake_feats``, ``d_real_feats``, real ones detached)."""
    D, lc = tr.d_train, tr.cfg.loss
    if D is None or tr.discriminator is None:
        return {"d_fake": None}, None
    feats = D_FEATURES in tr.needs
    with tr.autocast():
        d_real = D(he, ihc, features=feats)
        d_fake = D(he, fake.detach())
    d_real_logits = [f[-1] for f in d_real] if feats else d_real
    d_loss = gan_d_loss(lc.gan_mode, d_real_logits, d_fake, smooth=lc.gan_smooth)
    # D judges G's output with frozen weights and without DDP hooks (no D gradients).
    with requires_grad(tr.discriminator, False), tr.autocast():
        d_fake_g = tr.discriminator(he, fake, features=feats)
    if not feats:
        return {"d_fake": d_fake_g}, d_loss
    return {"d_fake": [f[-1] for f in d_fake_g], "d_fake_feats": [f[:-1] for f in d_fake_g],
            "d_real_feats": [[t.detach() for t in f[:-1]] for f in d_real]}, d_loss


def _frozen_features(tr: Trainer, ihc: torch.Tensor, fake: torch.Tensor, progress: float) -> dict[str, Any]:
    """Features of the frozen networks: the comparator's (``cmp_fake`` / ``cmp_real``, from
    ``loss.cmp_start`` on) and the VGG-19's (``vgg_fake`` / ``vgg_real``)."""
    out: dict[str, Any] = {"cmp_fake": None, "cmp_real": None}
    if tr.comparator is not None and COMPARATOR in tr.needs and progress >= tr.cfg.loss.cmp_start:
        # resize in float32 (antialiased resampling has no bf16 kernel), then embed under autocast
        with tr.autocast():
            out["cmp_fake"] = tr.comparator.features(prepare_images(fake.float(), tr.cmp_size))
            with torch.no_grad():
                out["cmp_real"] = tr.comparator.features(prepare_images(ihc.float(), tr.cmp_size))
    if tr.vgg is not None and VGG in tr.needs:
        with tr.autocast():
            out["vgg_fake"] = tr.vgg(fake)
            with torch.no_grad():
                out["vgg_real"] = tr.vgg(ihc)
    return out
