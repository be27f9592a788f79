"""The translation trainer: alternating discriminator / generator updates on paired H&E → IHC data.

One optimizer step (paper §2.4; pix2pix's scheme with DeReStainer's objective)::

    for each of grad_accum micro-batches:
        out  = G(he, ihc)                                   # ihc only feeds f_H's IHC branch (L_H)
        L_D  = LSGAN(D(he, ihc) → 1, D(he, out.ihc.detach()) → 0)      → backward into D
        L    = generator_losses(out, …, D(he, out.ihc) with D frozen, C(out.ihc), C(ihc))
                                                            → backward into G
    D.step(); G.step()                                      # both skipped if any loss is non-finite

G's adversarial term sees D *before* this step's D update (the two forward passes share one G
forward, and accumulation needs no stored graphs); with ``grad_accum = 1`` this differs from
pix2pix's D-then-G order only by that one step of D lag.

What makes a run resumable exactly (``deterministic=True`` and the same number of ranks): the data
order is a permutation seeded by ``(seed, epoch)`` and sharded by rank; the augmentation of each
item is drawn from a generator seeded by ``(seed, epoch, index)`` (so it does not depend on the
number of DataLoader workers nor on where a run was interrupted); checkpoints record the epoch and
the micro-batches already consumed in it, which a resumed run skips.

No host–device synchronisation happens inside a step: loss terms stay on the device and are summed
there; a non-finite loss skips the optimizer update through fused AdamW's ``found_inf`` input (the
flag GradScaler uses) and restores the BatchNorm statistics of that step, all without reading the
flag on the host. Values reach the host only at log time, and the run of consecutive bad steps
is checked every ``min(log_every, max_bad_steps)`` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import Config, dump_yaml, to_dict
from ..io import write_image, write_text
from ..losses import active_terms, gan_losses, generator_losses
from .checkpoint import CheckpointError, save_generator
from .distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    mix_seed,
    seed_everything,
    unwrap,
    worker_init_fn,
    wrap_model,
)
from .logging import RunLogger, sample_grid
from .state import (
    TrainState,
    check_compatible,
    checkpoint_dir,
    clean_incomplete,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

log = logging.getLogger("derestainer.train")

#: Validation metrics for which lower is better (all others: higher is better).
LOWER_IS_BETTER: frozenset[str] = frozenset({"mae", "l1", "loss", "fid", "kid"})


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses in a row, a run folder in the way, data too small, …)."""


# --------------------------------------------------------------------------------------------------
# Data: a seeded, shardable, resumable order and per-item seeded augmentation


class EpochSampler(Sampler[tuple[int, int]]):
    """This rank's share of a permutation seeded by ``(seed, epoch)``, minus the first ``skip`` items.

    Sharding is DistributedSampler's (``perm[rank::world]`` after dropping the tail so that every
    rank gets the same count). Yields ``(epoch, index)`` keys for :class:`SeededPairs`.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n, self.rank, self.world, self.seed = n, rank, world_size, seed
        self.epoch, self.skip = 0, 0

    @property
    def per_rank(self) -> int:
        return self.n // self.world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        return perm[self.rank:: self.world].tolist()[self.skip:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip)


class SeededPairs(Dataset):
    """A paired dataset whose random augmentation is a pure function of ``(seed, epoch, index)``.

    ``base`` must be deterministic (resize only); crop, flips and quarter turns are drawn here, with
    :func:`~derestainer.data.transforms.sample_params` from a generator seeded by the item's key,
    and applied identically to both images.
    """

    def __init__(self, base: Dataset, seed: int, crop: int = 0, flip: bool = True, rot90: bool = True) -> None:
        self.base, self.seed, self.crop, self.flip, self.rot90 = base, seed, crop, flip, rot90

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        from ..data.transforms import apply_params, sample_params

        epoch, index = key
        item = self.base[index]
        he, ihc = item["he"], item["ihc"]
        if self.crop or self.flip or self.rot90:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
            p = sample_params(he.shape[-2], he.shape[-1], self.crop, self.flip, self.rot90, generator=g)
            he, ihc = apply_params(he, p), apply_params(ihc, p)
        return {"he": he, "ihc": ihc, "level": int(item["level"]), "name": item["name"]}


# --------------------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def _requires_grad(module: nn.Module | None, flag: bool) -> Iterator[None]:
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


def _make_adamw(params: list[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where the device supports it (CUDA, CPU in recent torch): one kernel per step and
    a ``found_inf`` input that skips the update on the device."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _guarded_step(opt: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``opt.step()`` unless ``bad`` (a 0-dim bool tensor) is true.

    Fused AdamW reads the flag on the device (no sync): its kernel returns early and the step
    counters are decremented back. Other optimizers fall back to reading the flag on the host.
    """
    if opt.defaults.get("fused"):
        opt.found_inf = bad.to(torch.float32)  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
    elif not bool(bad):
        opt.step()


class _BufferGuard:
    """Snapshot of a module's floating/integer buffers (BatchNorm statistics), restored on a bad step
    with ``torch.where`` so that no host sync is needed."""

    def __init__(self, module: nn.Module | None) -> None:
        self.buffers = [b for b in module.buffers()] if module is not None else []
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def snapshot(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)

    def restore_if(self, bad: torch.Tensor) -> None:
        for s, b in zip(self.saved, self.buffers):
            b.copy_(torch.where(bad, s, b))


def _no_sync(module: nn.Module | None, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
    if skip_sync and module is not None and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's (small, plain-data) ``obj``, in rank order (``[obj]`` on one process)."""
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    raise ValueError(f"train.amp must be auto, bf16 or off, got {amp!r}")


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric in LOWER_IS_BETTER else new > old


# --------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds models, optimizers and data from a :class:`~derestainer.config.Config`; :meth:`run` trains.

    Args:
        cfg: the resolved config (``cfg.train.out`` is the run folder).
        resume: False (new run; refuses a folder that has checkpoints), True (continue from the run
            folder's ``latest`` checkpoint, or start fresh when it has none), or a checkpoint/run folder.
        env: a :class:`DistEnv`; default: from the ``torchrun`` environment.

    Attributes (after construction): ``generator`` / ``discriminator`` (plain modules), ``state``.
    """

    def __init__(self, cfg: Config, resume: bool | str | Path = False, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        tc = cfg.train
        self._owns_env = env is None  # only a process group this trainer joined is left by it
        self.env = env or init_distributed(tc.device)
        self.device = self.env.device
        self.run_dir = Path(tc.out)
        self.amp_dtype = _amp_dtype(tc.amp, self.device)
        self.channels_last = bool(tc.channels_last and self.device.type == "cuda")
        if tc.steps < 0 or tc.batch_size < 1 or tc.grad_accum < 1 or tc.max_bad_steps < 1:
            raise TrainingError("need train.steps ≥ 0, train.batch_size ≥ 1, train.grad_accum ≥ 1, train.max_bad_steps ≥ 1")
        seed_everything(tc.seed, tc.deterministic)
        self._pending: list[str] = []  # warnings raised before the logger exists
        self.logger: RunLogger | None = None
        self._last_ckpt_step: int | None = None
        try:
            self._setup(resume)
        except BaseException:
            if self.logger is not None:
                self.logger.close()
            if self._owns_env:
                cleanup(self.env)
            raise

    def _setup(self, resume: bool | str | Path) -> None:
        cfg, tc = self.cfg, self.cfg.train
        ckpt = self._resume_target(resume)

        # -- models (seeded: identical on every rank; DDP also broadcasts rank 0's weights)
        from ..models.registry import create_generator

        self.active = active_terms(cfg.loss)
        self.generator = create_generator(cfg.model).to(self.device)
        self.discriminator: nn.Module | None = None
        if "gan" in self.active:
            from ..models.discriminator import build_discriminator

            self.discriminator = build_discriminator(cfg.model).to(self.device)
        if self.channels_last:
            self.generator.to(memory_format=torch.channels_last)
            if self.discriminator is not None:
                self.discriminator.to(memory_format=torch.channels_last)
        self.rgb_from_hed = self._stain_matrix()
        self.comparator, self.cmp_size = self._load_comparator()

        d_lr = tc.d_lr or tc.lr
        self.opt_g = _make_adamw(list(self.generator.parameters()), tc.lr, tuple(tc.betas), tc.weight_decay)
        self.opt_d = (_make_adamw(list(self.discriminator.parameters()), d_lr, tuple(tc.betas), tc.weight_decay)
                      if self.discriminator is not None else None)

        self.state = TrainState(world_size=self.env.world_size)
        if ckpt is not None:
            self._load(ckpt)
        self.logger = RunLogger(self.run_dir, enabled=self.env.is_main, total=tc.steps, initial=self.state.step,
                                tensorboard=tc.tensorboard)
        for msg in self._pending:
            self.logger.write({"kind": "event", "step": self.state.step, "event": "warning", "message": msg})
        self._pending.clear()

        # f_H only receives gradients through L_H: without it, DDP must look for unused parameters.
        find_unused = "h" not in self.active and hasattr(self.generator, "f_h")
        self.g_train = wrap_model(self.generator, self.env, sync_bn=tc.sync_bn, find_unused=find_unused)
        self.d_train = (wrap_model(self.discriminator, self.env, sync_bn=tc.sync_bn)
                        if self.discriminator is not None else None)
        # SyncBatchNorm conversion builds new modules (sharing the parameters): keep plain references.
        self.generator = unwrap(self.g_train)
        if self.d_train is not None:
            self.discriminator = unwrap(self.d_train)
        self.g_guard, self.d_guard = _BufferGuard(self.generator), _BufferGuard(self.discriminator)

        self._build_data()

    # ---------------------------------------------------------------------------------------- setup
    def _resume_target(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            existing = list_checkpoints(self.run_dir)
            if existing:
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints (latest {existing[-1].name}); "
                    "continue it with --resume, or choose another --out")
            return None
        if resume is True:
            try:
                return resolve_checkpoint(self.run_dir)
            except CheckpointError:
                if self.env.is_main:
                    log.info("%s: no checkpoint yet, starting a new run", self.run_dir)
                return None
        return resolve_checkpoint(resume)

    def _stain_matrix(self) -> torch.Tensor | None:
        sep = getattr(getattr(self.generator, "destainer", None), "separation", None)
        m = getattr(sep, "rgb_from_hed", None)
        return m if isinstance(m, torch.Tensor) else None

    def _load_comparator(self) -> tuple[nn.Module | None, int | None]:
        if "cmp" not in self.active:
            return None, None
        path = self.cfg.train.comparator
        if not path:
            self._warn("train.comparator is not set: L_cmp is off for this run "
                       "(train one with `derestainer train-classifier` and pass train.comparator=FILE)")
            self.active = self.active - {"cmp"}
            return None, None
        from ..models.classifier import freeze, load_classifier

        model, meta = load_classifier(path, device=self.device)
        freeze(model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        size = meta.get("size")
        return model, int(size) if isinstance(size, int) and size > 0 else None

    def _warn(self, msg: str) -> None:
        if not self.env.is_main:
            return
        log.warning(msg)
        if self.logger is None:
            self._pending.append(msg)
        else:
            self.logger.write({"kind": "event", "step": self.state.step, "event": "warning", "message": msg})

    def _load(self, ckpt: Path) -> None:
        diffs = check_compatible(ckpt, self.cfg)
        self.state = load_checkpoint(ckpt, generator=self.generator, discriminator=self.discriminator,
                                     opt_g=self.opt_g, opt_d=self.opt_d, cfg=self.cfg)
        rng = self.state.rng
        if isinstance(rng, list):  # one state per rank (older, single-process checkpoints: one dict)
            rng = rng[self.env.rank] if self.env.rank < len(rng) else (rng[0] if rng else {})
        if rng:
            set_rng_state(rng)
        self._resharded: tuple[int, int, int] | None = None
        if self.state.world_size != self.env.world_size:
            # the old shard of a partly consumed epoch cannot be continued: move on to the next
            # epoch (the warning, with the count of skipped batches, comes once the data is known)
            self._resharded = (self.state.world_size, self.state.epoch, self.state.batch_in_epoch)
            if self.state.batch_in_epoch > 0:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
            self.state.world_size = self.env.world_size
        if self.env.is_main:
            changed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(diffs.items()))
            log.info("resuming from %s (step %d, epoch %d)%s", ckpt, self.state.step, self.state.epoch,
                     f"; config changes: {changed}" if changed else "")

    def _build_data(self) -> None:
        from dataclasses import replace as dc_replace

        from ..data.datasets import DatasetError, build_dataset

        dc, tc = self.cfg.data, self.cfg.train
        # The dataset only decodes and resizes; SeededPairs draws the augmentation (see module docstring).
        base = build_dataset(dc_replace(dc, crop=0, flip=False, rot90=False), dc.train_split, train=False)
        self.train_set = SeededPairs(base, tc.seed, crop=dc.crop, flip=dc.flip, rot90=dc.rot90)
        self.sampler = EpochSampler(len(base), self.env.rank, self.env.world_size, tc.seed)
        self.batches_per_epoch = self.sampler.per_rank // tc.batch_size
        if self.batches_per_epoch < 1:
            raise TrainingError(
                f"the training split has {len(base)} pairs: too few for batch_size {tc.batch_size} "
                f"on {self.env.world_size} rank(s); lower train.batch_size")
        if getattr(self, "_resharded", None) is not None:
            old_world, epoch, consumed = self._resharded
            msg = (f"checkpoint was written by {old_world} rank(s), this run has {self.env.world_size}: "
                   "the data order from here on differs from the original run")
            if consumed > 0:
                old_per_epoch = (len(base) // old_world) // tc.batch_size
                skipped = max(0, old_per_epoch - consumed)
                msg += (f"; {skipped} of the {old_per_epoch} micro-batches per rank of epoch {epoch} "
                        f"({skipped * old_world * tc.batch_size} pairs on {old_world} rank(s)) are skipped "
                        f"and training goes on with epoch {epoch + 1}")
            else:
                msg += f"; no batch is skipped (the checkpoint is at the start of epoch {epoch})"
            self._warn(msg)
        self.val_set: Dataset | None = None
        try:
            self.val_set = build_dataset(dc, dc.val_split, train=False)
        except (DatasetError, ValueError) as exc:
            self._warn(f"no held-out split '{dc.val_split}' ({exc}); validation is off")
        if self.val_set is not None and len(self.val_set) == 0:  # type: ignore[arg-type]
            self.val_set = None
        src = self.val_set if self.val_set is not None else base
        n = min(tc.sample_count, len(src))  # type: ignore[arg-type]
        self.sample_items = [src[i] for i in range(n)] if self.env.is_main and n > 0 else []

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        """The training loader, positioned at ``epoch`` after ``skip_batches`` batches.

        One loader for the whole run, so that worker processes persist across epochs; the sampler
        is re-read at the start of each epoch's iteration. The augmentation does not depend on the
        workers' seeds (see :class:`SeededPairs`), only the loader's own bookkeeping does.
        """
        dc, tc = self.cfg.data, self.cfg.train
        self.sampler.set_epoch(epoch, skip_batches * tc.batch_size)
        if getattr(self, "_train_loader", None) is None:
            self._train_loader = DataLoader(
                self.train_set, batch_size=tc.batch_size, sampler=self.sampler, drop_last=True,
                num_workers=dc.workers, pin_memory=self.device.type == "cuda",
                worker_init_fn=worker_init_fn if dc.workers > 0 else None, persistent_workers=dc.workers > 0,
                generator=torch.Generator().manual_seed(mix_seed(tc.seed, self.env.rank)),
            )
        return self._train_loader

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever; ``state.epoch`` / ``state.batch_in_epoch`` track the position."""
        while True:
            for batch in self._loader(self.state.epoch, self.state.batch_in_epoch):
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        from ..data.transforms import to_model_space

        y = to_model_space(x.to(self.device, non_blocking=True))
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ----------------------------------------------------------------------------------------- step
    def train_step(
        self, micro_batches: list[dict[str, Any]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over ``micro_batches`` (``grad_accum`` of them).

        Returns:
            ``(terms, bad, nonfinite)``: loss terms averaged over the micro-batches (0-dim device
            tensors; ``d`` is the discriminator loss, the others as :func:`generator_losses` names
            them), the step's 0-dim bool "skipped" flag, and per term a 0-dim bool "non-finite" flag.
        """
        G, D = self.g_train, self.d_train
        G.train()
        if D is not None:
            D.train()
        self.opt_g.zero_grad(set_to_none=True)
        if self.opt_d is not None:
            self.opt_d.zero_grad(set_to_none=True)
        self.g_guard.snapshot()
        self.d_guard.snapshot()
        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        need_ihc = "h" in self.active
        for k, batch in enumerate(micro_batches):
            last = k == n - 1
            he, ihc = self._to_device(batch["he"]), self._to_device(batch["ihc"])
            level = batch["level"].to(self.device, non_blocking=True)
            with _no_sync(G, not last), _no_sync(D, not last):
                with self._autocast():
                    out = G(he, ihc if need_ihc else None)
                d_fake_g = None
                if D is not None:
                    with self._autocast():
                        d_real = D(he, ihc)
                        d_fake = D(he, out.ihc.detach())
                    d_loss = gan_losses(self.cfg.loss.gan_mode)[0](d_real, d_fake)
                    (d_loss / n).backward()
                    bad = bad | ~torch.isfinite(d_loss)
                    sums["d"] = sums.get("d", 0) + d_loss.detach()
                    # D judges G's output with frozen weights and without DDP hooks (no D gradients).
                    with _requires_grad(self.discriminator, False), self._autocast():
                        d_fake_g = self.discriminator(he, out.ihc)  # type: ignore[misc]
                f_fake = f_real = None
                if self.comparator is not None:
                    from ..models.classifier import prepare_images

                    # resize in float32 (antialiased resampling has no bf16 kernel), then embed under autocast
                    with self._autocast():
                        f_fake = self.comparator.features(prepare_images(out.ihc.float(), self.cmp_size))
                        with torch.no_grad():
                            f_real = self.comparator.features(prepare_images(ihc.float(), self.cmp_size))
                total, terms = generator_losses(out, he, ihc, level, d_fake_g, f_fake, f_real, self.cfg.loss,
                                                self.rgb_from_hed)
                (total / n).backward()
            bad = bad | ~torch.isfinite(total)
            for name, v in terms.items():
                sums[name] = sums.get(name, 0) + v
        bad = all_reduce_max(bad.to(torch.float32), self.env) > 0  # one rank's NaN poisons the all-reduced grads
        if self.opt_d is not None:
            _guarded_step(self.opt_d, bad)
        _guarded_step(self.opt_g, bad)
        self.g_guard.restore_if(bad)
        self.d_guard.restore_if(bad)
        means = {name: v / n for name, v in sums.items()}
        return means, bad, {name: ~torch.isfinite(v) for name, v in means.items()}

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns a summary (also written to ``<run>/summary.json``).

        Raises:
            TrainingError: non-finite losses in ``max_bad_steps`` consecutive steps (and other fatal states).
        """
        t0 = time.perf_counter()
        try:
            if self.env.is_main:
                clean_incomplete(self.run_dir)
                write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            barrier(self.env)
            self._loop()
        except TrainingError as exc:
            self.logger.event(self.state.step, "stopped", str(exc), level=logging.ERROR)
            raise
        finally:
            self.logger.close()
            if self._owns_env:
                cleanup(self.env)
        summary = self._summary(time.perf_counter() - t0)
        if self.env.is_main:
            from ..io import write_json

            write_json(self.run_dir / "summary.json", summary)
        return summary

    def _loop(self) -> None:
        tc = self.cfg.train
        st = self.state
        batches = self._batches()
        zero = torch.zeros((), device=self.device)
        win: dict[str, torch.Tensor] = {}
        win_nonfinite: dict[str, torch.Tensor] = {}
        win_good = zero.clone()
        win_bad = zero.clone()
        streak = torch.full((), float(st.bad_streak), device=self.device)
        max_streak = streak.clone()
        check_every = max(1, min(tc.log_every or tc.max_bad_steps, tc.max_bad_steps))
        win_steps, win_t = 0, time.perf_counter()
        validated_epochs = self._epochs_completed()  # epochs ended before this run was (re)started
        self.last_terms: dict[str, float] = {}
        self.last_val: dict[str, Any] | None = st.history[-1] if st.history else None
        while st.step < tc.steps:
            micro = [next(batches) for _ in range(tc.grad_accum)]
            terms, bad, nonfinite = self.train_step(micro)
            st.step += 1
            win_steps += 1
            good = (~bad).to(zero.dtype)
            for name, v in terms.items():
                win[name] = win.get(name, zero) + torch.where(bad, zero, v.float())
            for name, f in nonfinite.items():
                win_nonfinite[name] = win_nonfinite.get(name, zero) + f.to(zero.dtype)
            win_good += good
            win_bad += 1.0 - good
            streak = (streak + 1.0) * (1.0 - good)
            max_streak = torch.maximum(max_streak, streak)
            self.logger.advance()

            logging_now = tc.log_every > 0 and st.step % tc.log_every == 0
            ckpt_now = (tc.ckpt_every > 0 and st.step % tc.ckpt_every == 0) or st.step == tc.steps
            if st.step % check_every == 0 or logging_now or ckpt_now:
                st.bad_streak = int(streak.item())
                if max_streak.item() >= tc.max_bad_steps:
                    st.skipped_steps += int(win_bad.item())
                    bad_terms = sorted(k for k, v in win_nonfinite.items() if v.item() > 0)
                    raise TrainingError(
                        f"stopped at step {st.step}: the loss was non-finite (NaN/Inf) in {int(max_streak.item())} "
                        f"consecutive steps (train.max_bad_steps={tc.max_bad_steps}); non-finite terms: "
                        f"{', '.join(bad_terms) or 'unknown'}. Lower train.lr, check the data, or use amp=off.")
            if logging_now or st.step == tc.steps:
                self._log_window(win, win_nonfinite, win_good, win_bad, win_steps, time.perf_counter() - win_t)
                win, win_nonfinite = {}, {}
                win_good, win_bad = zero.clone(), zero.clone()
                win_steps, win_t = 0, time.perf_counter()

            completed = self._epochs_completed()
            epoch_done = completed > validated_epochs
            validated_epochs = completed
            validate = (tc.val_every > 0 and st.step % tc.val_every == 0) or (tc.val_every == 0 and epoch_done)
            improved = False
            if validate or st.step == tc.steps:
                improved = self._validate()
            if tc.sample_every > 0 and st.step % tc.sample_every == 0:
                self._samples()
            if ckpt_now or improved:
                if improved:
                    st.bad_streak = int(streak.item())
                self._checkpoint()
        if self.env.is_main and tc.steps > 0:
            save_generator(self.run_dir / "generator.safetensors", self.generator, self.cfg,
                           extra={"step": st.step, "epoch": st.epoch})

    def _epochs_completed(self) -> int:
        """Epochs whose last batch has been consumed (an epoch may end inside a step with grad_accum > 1)."""
        st = self.state
        return st.epoch + (1 if st.batch_in_epoch >= self.batches_per_epoch else 0)

    def _log_window(self, win: dict[str, torch.Tensor], nonfinite: dict[str, torch.Tensor], good: torch.Tensor,
                    bad: torch.Tensor, steps: int, seconds: float) -> None:
        names = sorted(win)
        nf_names = sorted(nonfinite)
        vec = torch.stack([win[k] for k in names] + [nonfinite[k] for k in nf_names] + [good, bad]) if names else torch.stack([good, bad])
        vals = all_reduce_mean(vec, self.env).tolist()  # the one host sync of the window
        n_good = max(vals[-2], 1e-12)
        n_bad = vals[-1]
        values = {k: vals[i] / n_good for i, k in enumerate(names)} if vals[-2] > 0 else {k: math.nan for k in names}
        bad_terms = [k for i, k in enumerate(nf_names) if vals[len(names) + i] > 0]
        st, tc = self.state, self.cfg.train
        skipped = round(n_bad)
        st.skipped_steps += skipped
        rate = steps / seconds if seconds > 0 else math.nan
        imgs = rate * tc.batch_size * tc.grad_accum * self.env.world_size
        extra = {"epoch": st.epoch, "lr": self.opt_g.param_groups[0]["lr"], "steps_per_s": rate, "images_per_s": imgs,
                 "skipped": skipped}
        self.last_terms = values
        self.logger.scalars("train", st.step, values, **extra)
        if skipped:
            self.logger.event(st.step, "skipped",
                              f"step {st.step}: {skipped} step(s) of the last {steps} skipped for a non-finite loss "
                              f"({', '.join(bad_terms) or 'unknown term'})", level=logging.WARNING, count=skipped,
                              terms=bad_terms)
        main = {k: values[k] for k in ("total", "d", "mae", "ssim", "gan") if k in values}
        self.logger.postfix(main)
        if not self.logger.has_bar:
            shown = " ".join(f"{k}={v:.4g}" for k, v in main.items())
            self.logger.echo(f"step {st.step}/{tc.steps} epoch {st.epoch} {shown} ({rate:.2f} step/s)")

    # ----------------------------------------------------------------------------------- validation
    @torch.inference_mode()
    def evaluate(self, max_items: int = 0) -> dict[str, Any]:
        """SSIM / PSNR (uint8, scikit-image, BCI definitions, at the training size) and f_level accuracy
        on the held-out split. Runs on the calling rank only."""
        from ..data.transforms import from_model_space
        from ..metrics.pixel import psnr, ssim

        assert self.val_set is not None
        G = self.generator
        was_training = G.training
        G.eval()
        n = len(self.val_set)  # type: ignore[arg-type]
        if max_items > 0:
            n = min(n, max_items)
        # its own generator: iterating a loader draws a base seed, which must not come from the global
        # RNG (this runs on rank 0 only, and the global RNG state is part of the checkpoints)
        loader = DataLoader(torch.utils.data.Subset(self.val_set, range(n)), batch_size=self.cfg.train.batch_size,
                            shuffle=False, num_workers=self.cfg.data.workers,
                            generator=torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, self.state.step)))
        ssims: list[float] = []
        psnrs: list[float] = []
        correct = known = 0
        for batch in loader:
            he = self._to_device(batch["he"])
            with self._autocast():
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

    def _validate(self) -> bool:
        """Validate on rank 0 (the others wait); returns True when the best metric improved."""
        st, tc = self.state, self.cfg.train
        improved = False
        if self.val_set is not None and self.env.is_main:
            res = self.evaluate(tc.val_max)
            rec = {"step": st.step, "epoch": st.epoch, **res}
            st.history.append(rec)
            self.last_val = rec
            vals = {k: v for k, v in res.items() if isinstance(v, (int, float)) and v is not None}
            self.logger.scalars("val", st.step, vals, epoch=st.epoch)
            metric = tc.best_metric
            value = res.get(metric)
            if value is None:
                if not getattr(self, "_warned_metric", False):
                    self._warn(f"train.best_metric={metric!r} is not available (validation gives {sorted(res)}); no best checkpoint")
                    self._warned_metric = True
            elif _better(metric, float(value), st.best_value):
                st.best_value, st.best_step = float(value), st.step
                improved = True
            acc = res.get("level_acc")
            self.logger.echo(f"validation at step {st.step}: SSIM {res['ssim']:.4f}, PSNR {res['psnr']:.2f} dB"
                             + (f", HER2 accuracy {acc:.3f}" if acc is not None else "")
                             + (" (best)" if improved else ""))
        # every rank must take the same decisions (a best checkpoint means a barrier on every rank)
        flag = all_reduce_max(torch.tensor(float(improved), device=self.device), self.env)
        return bool(flag.item())

    # ------------------------------------------------------------------------------- samples/ckpts
    @torch.inference_mode()
    def _samples(self) -> None:
        if not self.env.is_main or not self.sample_items:
            return
        G = self.generator
        was_training = G.training
        G.eval()
        he = torch.stack([it["he"] for it in self.sample_items])
        ihc = torch.stack([it["ihc"] for it in self.sample_items])
        with self._autocast():
            fake = G(self._to_device(he)).ihc.float()
        G.train(was_training)
        from ..data.transforms import to_model_space

        grid = sample_grid(to_model_space(he), fake, to_model_space(ihc),
                           None if self.rgb_from_hed is None else self.rgb_from_hed.cpu())
        write_image(self.run_dir / "samples" / f"step-{self.state.step:07d}.png", grid.numpy())
        self.logger.image("samples", self.state.step, grid.numpy())

    def _checkpoint(self) -> None:
        st, tc = self.state, self.cfg.train
        if self._last_ckpt_step == st.step:  # (same on every rank)
            barrier(self.env)
            return
        # every rank's RNG states, so that each rank resumes its own streams
        st.rng = _gather_objects(rng_state(), self.env)
        self._last_ckpt_step = st.step
        if self.env.is_main:
            path = save_checkpoint(self.run_dir, generator=self.generator, discriminator=self.discriminator,
                                   opt_g=self.opt_g, opt_d=self.opt_d, cfg=self.cfg, state=st)
            keep = set()
            if st.best_step is not None:
                best = checkpoint_dir(self.run_dir, st.best_step)
                keep.add(best.name)
                if best.is_dir():
                    write_text(self.run_dir / "best", f"checkpoints/{best.name}\n")
            prune_checkpoints(self.run_dir, tc.keep_last, keep)
            self.logger.write({"kind": "event", "step": st.step, "event": "checkpoint", "path": str(path)})
        barrier(self.env)

    def _summary(self, seconds: float) -> dict[str, Any]:
        st = self.state
        ckpts = list_checkpoints(self.run_dir) if self.env.is_main else []
        return {
            "run_dir": str(self.run_dir),
            "steps": st.step,
            "epochs": self._epochs_completed() if hasattr(self, "batches_per_epoch") else st.epoch,
            "seconds": round(seconds, 3),
            "world_size": self.env.world_size,
            "losses": getattr(self, "last_terms", {}),
            "validation": getattr(self, "last_val", None),
            "best": {"metric": self.cfg.train.best_metric, "value": st.best_value, "step": st.best_step},
            "skipped_steps": st.skipped_steps,
            "checkpoint": str(ckpts[-1]) if ckpts else None,
            "config": to_dict(self.cfg),
        }


def train(cfg: Config, resume: bool | str | Path = False, env: DistEnv | None = None) -> dict[str, Any]:
    """Train the generator described by ``cfg`` (see :class:`Trainer`); returns the run summary.

    Launched by ``torchrun``, every rank calls this; only rank 0 logs and writes checkpoints.
    """
    return Trainer(cfg, resume=resume, env=env).run()
