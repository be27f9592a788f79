"""The translation trainer: alternating discriminator / generator updates on paired H&E → IHC data.

One optimizer step (paper §2.4, docs/method.md "Training"; pix2pix's scheme with DeReStainer's objective)::

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
the micro-batches already consumed in it, which a resumed run skips. The learning rate of step ``k``
is a function of ``k`` and the config (:mod:`.schedule`), and the validation files held out of the
training split are a function of the file names and ``data.val_seed`` (:func:`.setup.holdout_split`),
so neither depends on whether the run was resumed.

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
from torch.utils.data import DataLoader, Dataset

from derestainer.core.config import Config, dump_yaml, to_dict
from derestainer.core.errors import TrainingError
from derestainer.core.fileformat import unwrap_model
from derestainer.core.guard import output_lock, refuse_overlap
from derestainer.core.io import write_json, write_text
from derestainer.core.runs import clean_incomplete, list_checkpoints
from derestainer.data.transforms import to_model_space
from derestainer.losses import active_terms, needs_of
from derestainer.models.classifier import HER2Classifier
from derestainer.models.files import save_generator
from derestainer.models.vgg import VGG19Features, load_vgg19
from derestainer.training import resume as resume_mod
from derestainer.training import setup, step, validation
from derestainer.training.distributed import (
    DistEnv,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    seed_everything,
    wrap_model,
)
from derestainer.training.ema import GeneratorEMA
from derestainer.training.logging import LossWindow, RunLogger
from derestainer.training.resume import Resume, ResumeMode
from derestainer.training.sampling import EpochSampler, SeededPairs
from derestainer.training.schedule import apply_lr
from derestainer.training.state import TrainState

__all__ = ["Resume", "ResumeMode", "Trainer", "train"]

log = logging.getLogger("derestainer.train")


class Trainer:
    """Builds models, optimizers and data from a :class:`~derestainer.core.config.Config`; :meth:`run` trains.

    Args:
        cfg: the resolved config (``cfg.train.out`` is the run folder).
        resume: ``"new"`` (a new run; refuses a folder that has checkpoints), ``"latest"`` (continue
            from the run folder's ``latest`` checkpoint, or start fresh when it has none), or the
            :class:`~pathlib.Path` of a checkpoint or run folder (see :data:`Resume`).
        env: a :class:`DistEnv`; default: from the ``torchrun`` environment.

    Attributes (after construction): ``generator`` / ``discriminator`` (plain modules), ``state``.
    """

    discriminator: nn.Module | None
    opt_d: torch.optim.AdamW | None
    comparator: HER2Classifier | None
    vgg: VGG19Features | None
    ema: GeneratorEMA | None
    train_set: SeededPairs
    sampler: EpochSampler
    batches_per_epoch: int
    val_set: Dataset | None
    val_files: list[str] | None  # names held out of the training split (data.val_fraction), or None
    sample_items: list[dict[str, Any]]

    def __init__(self, cfg: Config, resume: Resume = "new", env: DistEnv | None = None) -> None:
        self.cfg = cfg
        tc = cfg.train
        self._owns_env = env is None  # only a process group this trainer joined is left by it
        self.env = env or init_distributed(tc.device)
        self.device = self.env.device
        self.run_dir = Path(tc.out)
        self.amp_dtype = step.amp_dtype(tc.amp, self.device)
        self.channels_last = bool(tc.channels_last and self.device.type == "cuda")
        if tc.steps < 0 or tc.batch_size < 1 or tc.grad_accum < 1 or tc.max_bad_steps < 1:
            raise TrainingError("need train.steps ≥ 0, train.batch_size ≥ 1, train.grad_accum ≥ 1, train.max_bad_steps ≥ 1")
        seed_everything(tc.seed, tc.deterministic)
        self._pending: list[str] = []  # warnings raised before the logger exists
        self.logger: RunLogger | None = None
        self.last_ckpt_step: int | None = None
        self.resharded: tuple[int, int, int] | None = None  # set by resume.load_into
        self.warned_metric = False
        self._train_loader: DataLoader | None = None
        self.last_terms: dict[str, float] = {}
        self.last_val: dict[str, Any] | None = None
        self._lock = contextlib.ExitStack()  # the run folder's lock, held by rank 0 until run() ends
        self._lock_held = [False]
        try:
            self._take_lock()
            self._setup(resume)
        except BaseException as exc:
            if self.logger is not None:
                self.logger.close()
            if self._owns_env:
                cleanup(self.env)
            self._lock.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def _setup(self, resume: Resume) -> None:
        cfg, tc = self.cfg, self.cfg.train
        ckpt = resume_mod.resume_target(self.run_dir, resume, self.env)
        self.active = active_terms(cfg.loss)
        self.terms_off: dict[str, str] = {}  # asked-for terms this run cannot compute, and why
        self.generator, self.discriminator = setup.build_models(cfg, self.active, self.device, self.channels_last)
        self.rgb_from_hed = setup.stain_matrix(self.generator)
        self.comparator, self.cmp_size = None, None
        if "cmp" in self.active and not tc.comparator:
            self._term_off("cmp", "train.comparator is not set: L_cmp is off for this run "
                           "(train one with `derestainer train-classifier` and pass train.comparator=FILE)")
        elif "cmp" in self.active:
            self.comparator, self.cmp_size = setup.load_comparator(tc.comparator, self.device, self.channels_last)
        self.vgg = None
        if "vgg" in self.active and not cfg.loss.vgg_weights:
            self._term_off("vgg", "loss.vgg is set but loss.vgg_weights is not: pix2pixHD's VGG loss is off for this "
                           "run (it needs ImageNet VGG-19 weights, which cannot be downloaded; pass a local file)")
        elif "vgg" in self.active:
            self.vgg = load_vgg19(cfg.loss.vgg_weights, self.device)
        self.needs = needs_of(self.active)
        self.opt_g, self.opt_d = setup.make_optimizers(cfg, self.generator, self.discriminator)
        self.ema = GeneratorEMA(self.generator, tc.ema, tc.ema_start) if tc.ema > 0 else None

        self.state = TrainState(world_size=self.env.world_size)
        if ckpt is not None:
            resume_mod.load_into(self, ckpt)
        setup.build_data(self)  # before the log opens: bad data leaves nothing in the run folder
        if self.env.is_main:  # the run folder is the run's own: not among, nor holding, the images it reads
            refuse_overlap(setup.data_folders(self), own_dirs=[self.run_dir])
        self.logger = RunLogger(self.run_dir, enabled=self.env.is_main, total=tc.steps, initial=self.state.step,
                                tensorboard=tc.tensorboard)
        if self.env.is_main and self.val_files is not None:  # so that a reader can reproduce the split
            write_text(self.run_dir / setup.VAL_FILES, "".join(f"{name}\n" for name in self.val_files))
        for msg in self._pending:
            self.logger.write({"kind": "event", "step": self.state.step, "event": "warning", "message": msg})
        self._pending.clear()

        # parameters trained only through the IHC branch (f_H, PatchNCE heads) or a variant's head
        # (the SimSiam predictor) get no gradient without it: DDP must then look for unused parameters.
        find_unused = setup.has_unused_parameters(self.generator, self.active, cfg.loss)
        self.g_train = wrap_model(self.generator, self.env, sync_bn=tc.sync_bn, find_unused=find_unused)
        self.d_train = (wrap_model(self.discriminator, self.env, sync_bn=tc.sync_bn)
                        if self.discriminator is not None else None)
        # SyncBatchNorm conversion builds new modules (sharing the parameters): keep plain references.
        self.generator = unwrap_model(self.g_train)
        if self.d_train is not None:
            self.discriminator = unwrap_model(self.d_train)
        self.g_guard, self.d_guard = step.BufferGuard(self.generator), step.BufferGuard(self.discriminator)

    # ---------------------------------------------------------------------------------------- helpers
    def _take_lock(self) -> None:
        """Rank 0 locks the run folder (again, for a second :meth:`run`): one writer per run."""
        held = self._lock_held  # a list, not self, in the callback: no cycle keeps a dropped Trainer's lock
        if self.env.is_main and not held[0]:
            self._lock.enter_context(output_lock(self.run_dir, folder=True))
            self._lock.callback(held.__setitem__, 0, False)
            held[0] = True

    def close(self) -> None:
        """Close the run log and release the run folder's lock (for a trainer that is not :meth:`run`)."""
        if self.logger is not None:
            self.logger.close()
        self._lock.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def run_log(self) -> RunLogger:
        """The run's logger (exists once the trainer is built)."""
        if self.logger is None:
            raise RuntimeError("the run logger is not open yet")
        return self.logger

    def _term_off(self, term: str, msg: str) -> None:
        """Switch an asked-for term off for this run, with a warning and a record in the summary."""
        self.warn(msg)
        self.active = self.active - {term}
        self.terms_off[term] = msg

    @property
    def model(self) -> nn.Module:
        """The generator that validation scores and the run exports: the moving average when ``train.ema`` is on."""
        return self.ema.module if self.ema is not None else self.generator

    def warn(self, msg: str) -> None:
        """Log a warning (rank 0), into the run log too once it is open."""
        if not self.env.is_main:
            return
        log.warning(msg)
        if self.logger is None:
            self._pending.append(msg)
        else:
            self.logger.write({"kind": "event", "step": self.state.step, "event": "warning", "message": msg})

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        """The training loader, positioned at ``epoch`` after ``skip_batches`` batches.

        One loader for the whole run, so that worker processes persist across epochs; the sampler
        is re-read at the start of each epoch's iteration. The augmentation does not depend on the
        workers' seeds (see :class:`~derestainer.training.sampling.SeededPairs`), only the loader's own bookkeeping does.
        """
        self.sampler.set_epoch(epoch, skip_batches * self.cfg.train.batch_size)
        if self._train_loader is None:
            self._train_loader = setup.make_loader(self)
        return self._train_loader

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever; ``state.epoch`` / ``state.batch_in_epoch`` track the position."""
        while True:
            for batch in self._loader(self.state.epoch, self.state.batch_in_epoch):
                self.state.batch_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A ``uint8`` batch → model space on the device (channels-last where the run uses it)."""
        y = to_model_space(x.to(self.device, non_blocking=True))
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's autocast context (``train.amp``)."""
        return step.autocast(self.device, self.amp_dtype)

    # ------------------------------------------------------------------------------------ public API
    def train_step(
        self, micro_batches: list[dict[str, Any]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step over ``micro_batches`` (``grad_accum`` of them).

        Returns:
            ``(terms, bad, nonfinite)``: loss terms averaged over the micro-batches (0-dim device
            tensors; ``d`` is the discriminator loss, the others as :func:`generator_losses` names
            them), the step's 0-dim bool "skipped" flag, and per term a 0-dim bool "non-finite" flag.
        """
        apply_lr(self.cfg.train, self.state.step, self.opt_g, self.opt_d)  # a function of the step: resume-exact
        return step.train_step(self, micro_batches)

    def evaluate(self, max_items: int = 0) -> dict[str, Any]:
        """SSIM / PSNR (uint8, scikit-image, BCI definitions, at the training size) and f_level accuracy
        on the held-out split. Runs on the calling rank only."""
        return validation.evaluate(self, max_items)

    def run(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns a summary (also written to ``<run>/summary.json``).

        Raises:
            TrainingError: non-finite losses in ``max_bad_steps`` consecutive steps (and other fatal states).
        """
        t0 = time.perf_counter()
        self._take_lock()
        with self._lock:  # released however the run ends
            try:
                if self.env.is_main:
                    clean_incomplete(self.run_dir)
                    write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
                barrier(self.env)
                self._loop()
            except TrainingError as exc:
                self.run_log.event(self.state.step, "stopped", str(exc), level=logging.ERROR)
                raise
            finally:
                self.run_log.close()
                if self._owns_env:
                    cleanup(self.env)
            summary = self._summary(time.perf_counter() - t0)
            if self.env.is_main:
                write_json(self.run_dir / "summary.json", summary)
        return summary

    # ---------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        tc, st = self.cfg.train, self.state
        batches = self._batches()
        win = LossWindow(self.device)
        streak = torch.full((), float(st.bad_streak), device=self.device)
        max_streak = streak.clone()
        check_every = max(1, min(tc.log_every or tc.max_bad_steps, tc.max_bad_steps))
        validated_epochs = self._epochs_completed()  # epochs ended before this run was (re)started
        self.last_val = st.history[-1] if st.history else None
        while st.step < tc.steps:
            terms, bad, nonfinite = self.train_step([next(batches) for _ in range(tc.grad_accum)])
            st.step += 1
            good = win.add(terms, bad, nonfinite)
            streak = (streak + 1.0) * (1.0 - good)
            max_streak = torch.maximum(max_streak, streak)
            self.run_log.advance()

            logging_now = tc.log_every > 0 and st.step % tc.log_every == 0
            ckpt_now = (tc.ckpt_every > 0 and st.step % tc.ckpt_every == 0) or st.step == tc.steps
            if st.step % check_every == 0 or logging_now or ckpt_now:
                st.bad_streak = int(streak.item())
                self._check_streak(int(max_streak.item()), win)
            if logging_now or st.step == tc.steps:
                self._log_window(win)
                win.reset()

            completed = self._epochs_completed()
            epoch_done = completed > validated_epochs
            validated_epochs = completed
            validate = (tc.val_every > 0 and st.step % tc.val_every == 0) or (tc.val_every == 0 and epoch_done)
            improved = validation.validate(self) if validate or st.step == tc.steps else False
            if tc.sample_every > 0 and st.step % tc.sample_every == 0:
                validation.write_samples(self)
            if ckpt_now or improved:
                if improved:
                    st.bad_streak = int(streak.item())
                resume_mod.write_checkpoint(self)
        if self.env.is_main and tc.steps > 0:
            save_generator(self.run_dir / "generator.safetensors", self.model, self.cfg,
                           extra={"step": st.step, "epoch": st.epoch, "ema": self.ema is not None})

    def _check_streak(self, max_streak: int, win: LossWindow) -> None:
        """Raise :class:`TrainingError` after ``train.max_bad_steps`` consecutive non-finite steps."""
        st, limit = self.state, self.cfg.train.max_bad_steps
        if max_streak < limit:
            return
        st.skipped_steps += int(win.bad.item())
        bad_terms = sorted(k for k, v in win.nonfinite.items() if v.item() > 0)
        raise TrainingError(
            f"stopped at step {st.step}: the loss was non-finite (NaN/Inf) in {max_streak} "
            f"consecutive steps (train.max_bad_steps={limit}); non-finite terms: "
            f"{', '.join(bad_terms) or 'unknown'}. Lower train.lr, check the data, or use amp=off.")

    def _epochs_completed(self) -> int:
        """Epochs whose last batch has been consumed (an epoch may end inside a step with grad_accum > 1)."""
        st = self.state
        return st.epoch + (1 if st.batch_in_epoch >= self.batches_per_epoch else 0)

    def _log_window(self, win: LossWindow) -> None:
        seconds = time.perf_counter() - win.t0
        names, nf_names = sorted(win.terms), sorted(win.nonfinite)
        vec = torch.stack([win.terms[k] for k in names] + [win.nonfinite[k] for k in nf_names] + [win.good, win.bad])
        vals = all_reduce_mean(vec, self.env).tolist()  # the one host sync of the window
        n_good = max(vals[-2], 1e-12)
        values = {k: vals[i] / n_good for i, k in enumerate(names)} if vals[-2] > 0 else dict.fromkeys(names, math.nan)
        bad_terms = [k for i, k in enumerate(nf_names) if vals[len(names) + i] > 0]
        st, tc, lg = self.state, self.cfg.train, self.run_log
        skipped = round(vals[-1])
        st.skipped_steps += skipped
        rate = win.steps / seconds if seconds > 0 else math.nan
        imgs = rate * tc.batch_size * tc.grad_accum * self.env.world_size
        extra = {"epoch": st.epoch, "lr": self.opt_g.param_groups[0]["lr"], "steps_per_s": rate, "images_per_s": imgs,
                 "skipped": skipped}
        self.last_terms = values
        lg.scalars("train", st.step, values, **extra)
        if skipped:
            lg.event(st.step, "skipped",
                     f"step {st.step}: {skipped} step(s) of the last {win.steps} skipped for a non-finite loss "
                     f"({', '.join(bad_terms) or 'unknown term'})", level=logging.WARNING, count=skipped,
                     terms=bad_terms)
        main = {k: values[k] for k in ("total", "d", "mae", "ssim", "gan") if k in values}
        lg.postfix(main)
        if not lg.has_bar:
            shown = " ".join(f"{k}={v:.4g}" for k, v in main.items())
            lg.echo(f"step {st.step}/{tc.steps} epoch {st.epoch} {shown} ({rate:.2f} step/s)")

    def _validation_source(self) -> dict[str, Any]:
        """Where validation pairs come from: the held-out training files (listed in val_files.txt) or a split."""
        if self.val_files is not None:
            return {"held_out_of": self.cfg.data.train_split, "files": len(self.val_files), "list": setup.VAL_FILES}
        return {"split": self.cfg.data.val_split or None, "pairs": len(self.val_set) if self.val_set is not None else 0}  # type: ignore[arg-type]

    def _summary(self, seconds: float) -> dict[str, Any]:
        st = self.state
        ckpts = list_checkpoints(self.run_dir) if self.env.is_main else []
        return {
            "run_dir": str(self.run_dir),
            "steps": st.step,
            "epochs": self._epochs_completed() if hasattr(self, "batches_per_epoch") else st.epoch,
            "seconds": round(seconds, 3),
            "world_size": self.env.world_size,
            "losses": self.last_terms,
            "validation": self.last_val,
            "validation_set": self._validation_source(),
            "best": {"metric": self.cfg.train.best_metric, "value": st.best_value, "step": st.best_step},
            "skipped_steps": st.skipped_steps,
            "active_terms": sorted(self.active) if hasattr(self, "active") else [],
            "terms_off": getattr(self, "terms_off", {}),
            "ema": self.cfg.train.ema or None,
            "checkpoint": str(ckpts[-1]) if ckpts else None,
            "config": to_dict(self.cfg),
        }


def train(cfg: Config, resume: Resume = "new", env: DistEnv | None = None) -> dict[str, Any]:
    """Train the generator described by ``cfg`` (see :class:`Trainer`); returns the run summary.

    Launched by ``torchrun``, every rank calls this; only rank 0 logs and writes checkpoints.
    """
    return Trainer(cfg, resume=resume, env=env).run()
