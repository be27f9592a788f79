"""Validation of the translation trainer on the held-out split, the best-metric rule and sample grids."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Subset

from derestainer.core.io import write_image
from derestainer.data.transforms import from_model_space, to_model_space
from derestainer.metrics.pixel import psnr, ssim
from derestainer.training.distributed import all_reduce_max, mix_seed
from derestainer.training.logging import sample_grid

if TYPE_CHECKING:
    from derestainer.training.loop import Trainer

#: Validation metrics for which lower is better (all others: higher is better).
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae", "l1", "loss", "fid", "kid"})


def better(metric: str, new: float, old: float | None) -> bool:
    """Whether ``new`` improves on ``old`` (None or NaN: any finite value does)."""
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric in LOWER_IS_BETTER else new > old


@torch.inference_mode()
def evaluate(tr: Trainer, max_items: int = 0) -> dict[str, Any]:
    """SSIM / PSNR and f_level accuracy of ``tr.model`` (the moving average with ``train.ema``) on ``tr.val_set`` (see :meth:`Trainer.evaluate`)."""
    if tr.val_set is None:
        raise ValueError("evaluate() needs a validation split")
    G = tr.model
    was_training = G.training
    G.eval()
    n = len(tr.val_set)  # type: ignore[arg-type]  # torch's Dataset declares no __len__
    if max_items > 0:
        n = min(n, max_items)
    # its own generator: iterating a loader draws a base seed, which must not come from the global
    # RNG (this runs on rank 0 only, and the global RNG state is part of the checkpoints)
    loader = DataLoader(Subset(tr.val_set, range(n)), batch_size=tr.cfg.train.batch_size,
                        shuffle=False, num_workers=tr.cfg.data.workers,
                        generator=torch.Generator().manual_seed(mix_seed(tr.cfg.train.seed, tr.state.step)))
    ssims: list[float] = []
    psnrs: list[float] = []
    correct = known = 0
    for batch in loader:
        he = tr.to_device(batch["he"])
        with tr.autocast():
            out = G(he)
        fake = from_model_space(out.ihc).permute(0, 2, 3, 1).cpu().numpy()
        real = batch["ihc"].permute(0, 2, 3, 1).numpy()
        for r, f in zip(real, fake):
            ssims.append(ssim(r, f))
            psnrs.append(psnr(r, f))
        if out.level_logits is not None:
            lv = batch["level"]
            mask = lv >= 0
            pred = out.level_logits.argmax(1).cpu()
            correct += int((pred[mask] == lv[mask]).sum())
            known += int(mask.sum())
    G.train(was_training)
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "n": len(ssims),
        "ssim": float(sum(ssims) / len(ssims)) if ssims else math.nan,
        "psnr": float(sum(finite) / len(finite)) if finite else math.nan,
        "level_acc": correct / known if known else None,
        "level_n": known,
    }


def validate(tr: Trainer) -> bool:
    """Validate on rank 0 (the others wait); returns True (on every rank) when the best metric improved."""
    st, tc = tr.state, tr.cfg.train
    improved = False
    if tr.val_set is not None and tr.env.is_main:
        res = evaluate(tr, tc.val_max)
        rec = {"step": st.step, "epoch": st.epoch, **res}
        st.history.append(rec)
        tr.last_val = rec
        vals = {k: v for k, v in res.items() if isinstance(v, (int, float)) and v is not None}
        tr.run_log.scalars("val", st.step, vals, epoch=st.epoch)
        metric = tc.best_metric
        value = res.get(metric)
        if value is None:
            if not tr.warned_metric:
                tr.warn(f"train.best_metric={metric!r} is not available (validation gives {sorted(res)}); no best checkpoint")
                tr.warned_metric = True
        elif better(metric, float(value), st.best_value):
            st.best_value, st.best_step = float(value), st.step
            improved = True
        acc = res.get("level_acc")
        tr.run_log.echo(f"validation at step {st.step}: SSIM {res['ssim']:.4f}, PSNR {res['psnr']:.2f} dB"
                    + (f", HER2 accuracy {acc:.3f}" if acc is not None else "")
                    + (" (best)" if improved else ""))
    # every rank must take the same decisions (a best checkpoint means a barrier on every rank)
    flag = all_reduce_max(torch.tensor(float(improved), device=tr.device), tr.env)
    return bool(flag.item())


@torch.inference_mode()
def write_samples(tr: Trainer) -> None:
    """Rank 0: the sample grid of ``tr.sample_items`` to ``<run>/samples/step-NNNNNNN.png`` and the logs."""
    if not tr.env.is_main or not tr.sample_items:
        return
    G = tr.model
    was_training = G.training
    G.eval()
    he = torch.stack([it["he"] for it in tr.sample_items])
    ihc = torch.stack([it["ihc"] for it in tr.sample_items])
    with tr.autocast():
        fake = G(tr.to_device(he)).ihc.float()
    G.train(was_training)
    grid = sample_grid(to_model_space(he), fake, to_model_space(ihc),
                       None if tr.rgb_from_hed is None else tr.rgb_from_hed.cpu())
    write_image(tr.run_dir / "samples" / f"step-{tr.state.step:07d}.png", grid.numpy())
    tr.run_log.image("samples", tr.state.step, grid.numpy())
