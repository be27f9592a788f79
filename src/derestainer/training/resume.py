"""The trainer's checkpoint glue: which checkpoint a run resumes from, loading it into a trainer
(across a change in the number of ranks), and writing / pruning checkpoints during a run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch.distributed as dist

from derestainer.core.errors import CheckpointError, TrainingError
from derestainer.core.io import write_text
from derestainer.core.runs import BEST, CHECKPOINTS, checkpoint_dir, find_checkpoint, list_checkpoints, read_pointer
from derestainer.training.distributed import DistEnv, barrier
from derestainer.training.plaindata import rng_state, set_rng_state
from derestainer.training.state import check_compatible, load_checkpoint, prune_checkpoints, read_state, save_checkpoint

if TYPE_CHECKING:
    from derestainer.training.loop import Trainer

log = logging.getLogger("derestainer.train")

#: How a run starts: ``new`` refuses a run folder that holds checkpoints; ``latest`` continues from
#: the run folder's latest checkpoint (or starts fresh when it has none). A path instead names the
#: checkpoint (or run folder) to continue from.
ResumeMode = Literal["new", "latest"]
Resume: TypeAlias = ResumeMode | Path


def resume_target(run_dir: Path, resume: Resume, env: DistEnv) -> Path | None:
    """The checkpoint folder a run with ``resume`` starts from (None: a new run).

    Its ``state.json`` is read and checked here, before any model is built: a malformed state is a
    :class:`CheckpointError` before any training work.
    """
    if isinstance(resume, Path):
        ckpt = find_checkpoint(resume)
        read_state(ckpt)
        return ckpt
    if resume == "latest":
        read_pointer(run_dir)  # a pointer leading out of the run folder is an error, not "no checkpoint yet"
        try:
            ckpt = find_checkpoint(run_dir)
        except CheckpointError:
            if env.is_main:
                log.info("%s: no checkpoint yet, starting a new run", run_dir)
            return None
        read_state(ckpt)
        return ckpt
    if resume != "new":
        raise ValueError(f"resume must be 'new', 'latest' or a Path, got {resume!r}")
    existing = list_checkpoints(run_dir)
    if existing:
        raise TrainingError(
            f"{run_dir} already holds checkpoints (latest {existing[-1].name}); "
            "continue it with --resume, or choose another --out")
    return None


def load_into(tr: Trainer, ckpt: Path) -> None:
    """Load ``ckpt`` into ``tr`` (models, optimizers, state, this rank's RNG states).

    When the number of ranks changed, a partly consumed epoch cannot be continued (its old shard is
    gone): the state moves on to the next epoch and ``tr.resharded`` records
    ``(old world size, epoch, micro-batches consumed)`` for :func:`reshard_warning`.
    """
    diffs = check_compatible(ckpt, tr.cfg)
    tr.state = load_checkpoint(ckpt, generator=tr.generator, discriminator=tr.discriminator,
                               opt_g=tr.opt_g, opt_d=tr.opt_d, cfg=tr.cfg,
                               ema=tr.ema.module if tr.ema is not None else None)
    st, env = tr.state, tr.env
    rng = st.rng
    if isinstance(rng, list):  # one state per rank (older, single-process checkpoints: one dict)
        rng = rng[env.rank] if env.rank < len(rng) else (rng[0] if rng else {})
    if rng:
        set_rng_state(rng, f"{ckpt}/state.json: rng")
    if st.world_size != env.world_size:
        tr.resharded = (st.world_size, st.epoch, st.batch_in_epoch)
        if st.batch_in_epoch > 0:
            st.epoch += 1
            st.batch_in_epoch = 0
        st.world_size = env.world_size
    if env.is_main:
        changed = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in sorted(diffs.items()))
        log.info("resuming from %s (step %d, epoch %d)%s", ckpt, st.step, st.epoch,
                 f"; config changes: {changed}" if changed else "")


def reshard_warning(resharded: tuple[int, int, int], world_size: int, n_pairs: int, batch_size: int) -> str:
    """The warning for a run resumed on another number of ranks (see :func:`load_into`)."""
    old_world, epoch, consumed = resharded
    msg = (f"checkpoint was written by {old_world} rank(s), this run has {world_size}: "
           "the data order from here on differs from the original run")
    if consumed > 0:
        old_per_epoch = (n_pairs // old_world) // batch_size
        skipped = max(0, old_per_epoch - consumed)
        msg += (f"; {skipped} of the {old_per_epoch} micro-batches per rank of epoch {epoch} "
                f"({skipped * old_world * batch_size} pairs on {old_world} rank(s)) are skipped "
                f"and training goes on with epoch {epoch + 1}")
    else:
        msg += f"; no batch is skipped (the checkpoint is at the start of epoch {epoch})"
    return msg


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's (small, plain-data) ``obj``, in rank order (``[obj]`` on one process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def write_checkpoint(tr: Trainer) -> None:
    """Every rank: checkpoint ``tr`` at its current step (rank 0 writes, then prunes old ones)."""
    st, tc = tr.state, tr.cfg.train
    if tr.last_ckpt_step == st.step:  # (same on every rank)
        barrier(tr.env)
        return
    # every rank's RNG states, so that each rank resumes its own streams
    st.rng = gather_objects(rng_state(), tr.env)
    tr.last_ckpt_step = st.step
    if tr.env.is_main:
        path = save_checkpoint(tr.run_dir, generator=tr.generator, discriminator=tr.discriminator,
                               opt_g=tr.opt_g, opt_d=tr.opt_d, cfg=tr.cfg, state=st,
                               ema=tr.ema.module if tr.ema is not None else None)
        keep = set()
        if st.best_step is not None:
            best = checkpoint_dir(tr.run_dir, st.best_step)
            keep.add(best.name)
            if best.is_dir():
                write_text(tr.run_dir / BEST, f"{CHECKPOINTS}/{best.name}\n")
        prune_checkpoints(tr.run_dir, tc.keep_last, keep)
        tr.run_log.write({"kind": "event", "step": st.step, "event": "checkpoint", "path": str(path)})
    barrier(tr.env)
