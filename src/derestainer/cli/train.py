"""``derestainer train``: train a translation model (DeReStainer or a baseline) on paired data."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(short_help="Train DeReStainer (or a baseline) on paired H&E/IHC data.")
@click.option("--config", "-c", "config", default=None, metavar="PRESET|FILE.yaml",
              help="Preset (paper, tiny, no_stain, no_dab, …) or YAML file. Default: paper; with --resume, "
                   "the run folder's config.yaml, or with --resume CKPT the checkpoint's config.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value, e.g. --set train.lr=2e-4 (repeatable).")
@click.option("--data", "data_root", type=click.Path(path_type=Path), default=None,
              help="Dataset folder (sets data.root).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder for checkpoints, logs and samples (sets train.out). Default with --resume CKPT: "
                   "the checkpoint's run folder.")
@click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None, metavar="[CKPT]",
              help="Continue the run in --out from its latest checkpoint, or from the checkpoint folder CKPT.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps (sets train.steps; with --resume, the new total).")
@click.option("--dry-run", is_flag=True, help="Print the resolved config as YAML and exit.")
def train(config: str | None, overrides: tuple[str, ...], data_root: Path | None, out_dir: Path | None,
          resume: str | None, steps: int | None, dry_run: bool) -> None:
    """Train a generator with alternating discriminator/generator updates (paper §2.4, §3.1).

    The resolved config is written to OUT/config.yaml and into every checkpoint
    (OUT/checkpoints/step-NNNNNNN/); OUT/log.jsonl has every loss term, OUT/samples/ the sample
    grids. For several GPUs or nodes, launch with torchrun:

        torchrun --nproc_per_node 4 -m derestainer train --config paper --data BCI --out runs/paper
    """
    import logging
    import os

    from derestainer.core.config import dump_yaml, from_dict, load_config, parse_override, replace
    from derestainer.core.runs import CHECKPOINTS, find_checkpoint
    from derestainer.training.resume import Resume
    from derestainer.training.state import read_state

    preset = config
    ckpt_cfg: dict | None = None  # the config stored in the checkpoint given to --resume
    if preset is None and resume is not None and resume != "latest":
        ckpt = find_checkpoint(resume)
        _, ckpt_cfg = read_state(ckpt)
        if out_dir is None:  # the checkpoint's own run folder (…/RUN/checkpoints/step-N)
            out_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else Path(resume)
    if ckpt_cfg is not None:
        cfg = from_dict(ckpt_cfg)
        for item in overrides:
            (section, key), value = parse_override(item)
            cfg = replace(cfg, **{section: {key: value}})
    else:
        run_cfg = (out_dir / "config.yaml") if out_dir is not None else None
        use_run_cfg = preset is None and resume is not None and run_cfg is not None and run_cfg.is_file()
        cfg = load_config(str(run_cfg) if use_run_cfg else (preset or "paper"), list(overrides))
    if data_root is not None:
        cfg = replace(cfg, data={"root": str(data_root)})
    if out_dir is not None:
        cfg = replace(cfg, train={"out": str(out_dir)})
    if steps is not None:
        cfg = replace(cfg, train={"steps": steps})
    if dry_run:
        click.echo(dump_yaml(cfg), nl=False)
        return

    from derestainer.training.loop import train as run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    target: Resume = "new" if resume is None else "latest" if resume == "latest" else Path(resume)
    summary = run_training(cfg, resume=target)
    val = summary.get("validation") or {}
    msg = f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; run folder {summary['run_dir']}"
    if val:
        msg += f"; last validation SSIM {val.get('ssim', float('nan')):.4f}, PSNR {val.get('psnr', float('nan')):.2f} dB"
    if summary.get("world_size", 1) == 1 or os.environ.get("RANK", "0") == "0":
        click.echo(msg)
