"""The translation trainer: overfitting, exact resume after kill -9, NaN handling, checkpoints, CLI.

Everything runs the ``tiny`` preset at 32 px on a few pairs written by the test in the BCI layout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from derestainer.cli import main
from derestainer.core.config import load_config, replace
from derestainer.core.errors import CheckpointError, TrainingError
from derestainer.core.runs import checkpoint_dir, clean_incomplete, find_checkpoint, list_checkpoints
from derestainer.models.files import load_generator
from derestainer.training import loop as loop_mod
from derestainer.training import step as step_mod
from derestainer.training.logging import SAMPLE_COLUMNS, read_jsonl, sample_grid
from derestainer.training.loop import Trainer, train
from derestainer.training.plaindata import flatten_state, unflatten_state
from derestainer.training.resume import write_checkpoint
from derestainer.training.sampling import EpochSampler, SeededPairs
from derestainer.training.state import prune_checkpoints, verify_checkpoint

LABELS = ("0", "1+", "2+", "3+")
SIZE = 32


def write_pairs(root: Path, n_train: int, n_test: int, size: int = SIZE, seed: int = 0) -> Path:
    """Smooth random H&E/IHC pairs in the BCI layout; the IHC is a fixed colour map of the H&E, so
    that the translation is learnable."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            coarse = rng.random((size // 8, size // 8, 3))
            base = np.kron(coarse, np.ones((8, 8, 1)))  # blocky, low-frequency content
            he = (255 * (0.35 + 0.6 * base * np.array([0.8, 0.45, 0.9]))).astype(np.uint8)
            ihc = (255 * (0.3 + 0.6 * base[..., ::-1] * np.array([0.7, 0.55, 0.35]))).astype(np.uint8)
            name = f"{i:05d}_{split}_{LABELS[i % 4]}.png"
            for stain, img in (("HE", he), ("IHC", ihc)):
                d = root / stain / split
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / name)
    return root


def tiny_cfg(data: Path, out: Path, **train: object):
    cfg = load_config("tiny", [])
    t = {"out": str(out), "steps": 8, "batch_size": 2, "log_every": 2, "ckpt_every": 4, "sample_every": 0,
         "tensorboard": "off", "deterministic": True, "device": "cpu"}
    t.update(train)
    # validation on the written test split, as these tests were designed (the carved split: test_protocol_training)
    return replace(cfg, data={"root": str(data), "size": SIZE, "val_split": "test"}, train=t)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    # threads per process can be 10x slower than one.
    n = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det)  # train.deterministic sets it process-wide


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("bci"), n_train=6, n_test=2)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ learning
def test_overfits_one_fixed_batch(tmp_path: Path) -> None:
    # Two pairs, batch 2, no augmentation: every step sees the same batch.
    root = write_pairs(tmp_path / "d", n_train=2, n_test=0)
    cfg = tiny_cfg(root, tmp_path / "run", steps=40, log_every=1, ckpt_every=0)  # the tiny preset's lr
    cfg = replace(cfg, data={"flip": False, "rot90": False})
    summary = train(cfg)
    recs = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    assert len(recs) == 40 and summary["steps"] == 40
    for term in ("mae", "total"):  # L1 to the target, and the whole generator objective
        first, last = recs[0][term], np.mean([r[term] for r in recs[-5:]])
        assert last < 0.5 * first, (term, first, last)
    # every active loss term is logged (L_cmp is off without a comparator; a warning says so)
    assert {"total", "d", "gan", "mae", "ssim", "dab", "h", "level"} <= set(recs[-1])
    events = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "event"]
    assert any("comparator" in e.get("message", "") for e in events)
    # no held-out split: validation is off, and said so
    assert any("validation is off" in e.get("message", "") for e in events)
    # the final generator is an exported model that inference can load as it is
    _, cfg2, meta = load_generator(tmp_path / "run" / "generator.safetensors")
    assert meta["step"] == 40 and cfg2.model == cfg.model


# ------------------------------------------------------------------------------ kill -9 / resume
KILL_SETS = {"data.size": SIZE, "train.steps": 12, "train.batch_size": 2, "train.ckpt_every": 3, "train.log_every": 3,
             "train.deterministic": "true", "train.tensorboard": "off", "train.sample_every": 6, "train.device": "cpu",
             "train.keep_last": 2}


def _cli_args(data: Path, out: Path) -> list[str]:
    args = [sys.executable, "-m", "derestainer", "train", "--config", "tiny", "--data", str(data), "--out", str(out)]
    for k, v in KILL_SETS.items():
        args += ["--set", f"{k}={v}"]
    return args


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_kill9_then_resume_equals_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    # The uninterrupted reference runs in this process (one thread, like the OMP_NUM_THREADS=1 subprocesses).
    cfg = load_config("tiny", [f"{k}={v}" for k, v in KILL_SETS.items()])
    train(replace(cfg, data={"root": str(data)}, train={"out": str(ref)}))

    proc = subprocess.Popen(_cli_args(data, run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (run / "latest").is_file():
        assert proc.poll() is None, "training ended before writing its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = find_checkpoint(run)
    assert verify_checkpoint(killed_at)["step"] < 12, "the run was not interrupted"

    # `--out RUN --resume` alone continues with the run's own config.yaml
    resume = [sys.executable, "-m", "derestainer", "train", "--out", str(run), "--resume"]
    done = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr

    # same final step, every checkpoint complete and loadable, no temporary folder left
    final = find_checkpoint(run)
    assert json.loads((final / "state.json").read_text())["step"] == 12
    ckpts = list_checkpoints(run)
    assert ckpts and all(verify_checkpoint(c) for c in ckpts)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # weights, BatchNorm statistics and optimizer states equal those of the uninterrupted run, bit for bit
    for name in ("generator", "discriminator", "optim_g", "optim_d"):
        a = load_file(find_checkpoint(ref) / f"{name}.safetensors")
        b = load_file(final / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    # the resumed run continued the log and the sample grids
    # the log reads as one run: the killed run's records after its checkpoint were dropped
    steps = [r["step"] for r in read_jsonl(run / "log.jsonl") if r["kind"] == "train"]
    assert steps == [3, 6, 9, 12]
    assert (run / "samples" / "step-0000012.png").is_file()
    assert (run / "config.yaml").is_file()


def test_resume_refuses_a_checkpoint_of_another_model(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data, tmp_path / "run", steps=2, ckpt_every=2)
    train(cfg)
    other = replace(cfg, model={"ngf": 16})
    with pytest.raises(CheckpointError, match="model.ngf"):
        Trainer(other, resume="latest")
    # a new run never silently overwrites an existing one
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(cfg, resume="new")
    # an explicit checkpoint folder
    with Trainer(cfg, resume=checkpoint_dir(tmp_path / "run", 2)) as tr:  # closing releases the run folder
        assert tr.state.step == 2
    # a generator file is not a run checkpoint
    with pytest.raises(CheckpointError):
        Trainer(cfg, resume=tmp_path / "run" / "generator.safetensors")


# ----------------------------------------------------------------------------------- NaN handling
def test_non_finite_losses_skip_steps_then_stop(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = step_mod.generator_losses

    def nan_losses(*args, **kwargs):
        total, terms = real(*args, **kwargs)
        terms = {**terms, "mae": terms["mae"] * float("nan")}
        return total * float("nan"), terms

    monkeypatch.setattr(step_mod, "generator_losses", nan_losses)
    cfg = tiny_cfg(data, tmp_path / "run", steps=20, max_bad_steps=3, log_every=10)
    tr = Trainer(cfg)
    before = _params(tr.generator)
    d_before = _params(tr.discriminator)
    with pytest.raises(TrainingError, match=r"non-finite.*3 consecutive steps.*mae"):
        tr.run()
    # checked every min(log_every, max_bad_steps) = 3 steps, and every step is bad from the first:
    # the streak reaches 3 exactly at the first check
    assert tr.state.step == 3
    # skipped steps changed nothing: weights, BatchNorm statistics, optimizer step counts
    for k, v in _params(tr.generator).items():
        assert torch.equal(v, before[k]), k
    for k, v in _params(tr.discriminator).items():
        assert torch.equal(v, d_before[k]), k
    assert all(float(s["step"]) == 0.0 for s in tr.opt_g.state.values())
    events = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "event"]
    assert any(e["event"] == "stopped" for e in events)


def test_a_caller_supplied_env_survives_run(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derestainer.training.distributed import DistEnv

    calls: list[object] = []
    monkeypatch.setattr(loop_mod, "cleanup", calls.append)
    env = DistEnv(0, 1, 0, torch.device("cpu"), None)
    tr = Trainer(tiny_cfg(data, tmp_path / "run", steps=1, ckpt_every=0), env=env)
    assert tr.env is env
    tr.run()
    assert calls == []  # the caller's process group is the caller's to leave
    # a trainer that made its own env leaves it
    Trainer(tiny_cfg(data, tmp_path / "run2", steps=1, ckpt_every=0)).run()
    assert len(calls) == 1


def test_resume_across_world_sizes_and_older_configs(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data, tmp_path / "run", steps=2, ckpt_every=2)
    train(cfg)
    ckpt = checkpoint_dir(tmp_path / "run", 2)
    state_file = ckpt / "state.json"
    orig = json.loads(state_file.read_text())
    assert isinstance(orig["rng"], list) and len(orig["rng"]) == 1  # one RNG state per rank

    def resume_with(**changes: object) -> Trainer:
        state_file.write_text(json.dumps({**orig, **changes}))
        tr = Trainer(cfg, resume="latest")
        tr.close()  # releases the run folder for the next trainer
        return tr

    # written by 2 ranks at the start of an epoch: nothing to skip, the epoch is kept
    tr = resume_with(world_size=2, epoch=1, batch_in_epoch=0)
    assert (tr.state.epoch, tr.state.batch_in_epoch, tr.state.world_size) == (1, 0, 1)
    # inside an epoch: the rest of it is skipped, and the warning says how much
    tr = resume_with(world_size=2, epoch=1, batch_in_epoch=1)
    assert (tr.state.epoch, tr.state.batch_in_epoch) == (2, 0)
    msgs = [r.get("message", "") for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "event"]
    assert any("no batch is skipped" in m for m in msgs)
    # 6 pairs on 2 ranks, batch 2: one micro-batch per rank and epoch, already consumed
    assert any("0 of the 1 micro-batches per rank of epoch 1" in m for m in msgs)
    # a single-process checkpoint from before per-rank RNG states (one dict) still loads
    assert resume_with(rng=orig["rng"][0]).state.step == 2
    # a key added to the schema after the checkpoint was written takes its default
    from derestainer.core.config import Config, to_dict

    default_model = to_dict(Config())["model"]
    key = next(k for k, v in to_dict(cfg)["model"].items() if v == default_model[k])
    old_cfg = json.loads(json.dumps(orig["config"]))
    del old_cfg["model"][key]
    assert resume_with(config=old_cfg).state.step == 2


def test_rewriting_a_checkpoint_keeps_one_in_place(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derestainer.training import state as state_mod

    tr = Trainer(tiny_cfg(data, tmp_path / "run", steps=2, ckpt_every=0))
    write_checkpoint(tr)
    final = checkpoint_dir(tmp_path / "run", 0)
    assert (final / "state.json").is_file()
    real_replace = os.replace
    seen: list[bool] = []

    def fail_after_move_aside(src, dst):  # an error between moving the old folder aside and the new one in
        real_replace(src, dst)
        if Path(dst).name.startswith(".tmp-"):  # the old folder goes to a name clean_incomplete removes
            seen.append(Path(dst).name)
            raise KeyboardInterrupt

    monkeypatch.setattr(state_mod.os, "replace", fail_after_move_aside)
    tr.last_ckpt_step = None
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tr)
    monkeypatch.undo()
    assert seen
    # the earlier checkpoint was put back, and the new one's temporary folder removed
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [final.name]
    assert (final / "state.json").is_file()
    # a rewrite that succeeds leaves no temporary folder behind
    tr.last_ckpt_step = None
    write_checkpoint(tr)
    assert (final / "state.json").is_file()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [final.name]


def test_a_single_non_finite_step_is_skipped_and_logged(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = step_mod.generator_losses
    calls = {"n": 0}

    def one_nan(*args, **kwargs):
        calls["n"] += 1
        total, terms = real(*args, **kwargs)
        return (total * float("inf"), terms) if calls["n"] == 2 else (total, terms)

    monkeypatch.setattr(step_mod, "generator_losses", one_nan)
    summary = train(tiny_cfg(data, tmp_path / "run", steps=4, log_every=2, ckpt_every=0))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    recs = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert [r["skipped"] for r in recs if r["kind"] == "train"] == [1, 0]
    assert any(r.get("event") == "skipped" for r in recs)
    # logged averages are over the good steps only
    assert all(np.isfinite(r["total"]) for r in recs if r["kind"] == "train")


# ------------------------------------------------------------------------------- run bookkeeping
def test_grad_accum_validation_best_and_samples(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data, tmp_path / "run", steps=6, grad_accum=2, ckpt_every=2, keep_last=1, sample_every=3,
                   best_metric="psnr", tensorboard="auto")
    summary = train(cfg)
    run = tmp_path / "run"
    # 6 pairs, batch 2, 2 micro-batches per step: an epoch ends every 1.5 steps → 4 epochs
    assert summary["epochs"] == 4
    vals = [r for r in read_jsonl(run / "log.jsonl") if r["kind"] == "val"]
    assert len(vals) >= 4 and all(0 <= v["ssim"] <= 1 and v["n"] == 2 for v in vals)
    assert all(v["level_acc"] in (0.0, 0.5, 1.0) for v in vals)
    best = summary["best"]
    assert best["value"] == max(v["psnr"] for v in vals)
    # keep_last=1 plus the best checkpoint
    names = [p.name for p in list_checkpoints(run)]
    assert checkpoint_dir(run, 6).name in names
    assert checkpoint_dir(run, best["step"]).name in names and len(names) <= 2
    assert (run / "best").read_text().strip().endswith(checkpoint_dir(run, best["step"]).name)
    grid = np.asarray(Image.open(run / "samples" / "step-0000006.png"))
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        assert list((run / "tb").glob("events.out.tfevents.*"))
    assert grid.shape == (2 + 2 * (SIZE + 2), 2 + len(SAMPLE_COLUMNS) * (SIZE + 2), 3)


def test_checkpoint_folders_are_atomic_and_pruned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        d = checkpoint_dir(run, step)
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    # an interrupted write leaves only a hidden temporary folder, which is neither listed nor kept
    stale = run / "checkpoints" / ".tmp-step-0000005-abc"
    stale.mkdir()
    (stale / "generator.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(run)][-1] == "step-0000004"
    assert clean_incomplete(run) == [stale] and not stale.exists()
    (run / "latest").write_text("checkpoints/step-0000002\n")
    gone = prune_checkpoints(run, keep_last=1, keep={"step-0000001"})
    assert sorted(p.name for p in gone) == ["step-0000003"]
    assert find_checkpoint(run).name == "step-0000002"


def test_optimizer_state_flattens_to_tensors_and_json() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.5, 0.999))
    m(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    sd = opt.state_dict()
    tensors, structure = flatten_state(sd)
    json.dumps(structure)  # plain JSON, no pickle
    back = unflatten_state(tensors, json.loads(json.dumps(structure)))
    assert back["param_groups"][0]["betas"] == (0.5, 0.999)
    assert back["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)
    with pytest.raises(TypeError):
        flatten_state({"f": object()})


# ------------------------------------------------------------------------------------ data order
def test_epoch_sampler_shards_skips_and_is_seeded() -> None:
    a, b = EpochSampler(10, 0, 2, seed=3), EpochSampler(10, 1, 2, seed=3)
    for s in (a, b):
        s.set_epoch(1)
    ia, ib = a.indices(), b.indices()
    assert len(ia) == len(ib) == 5 and not set(ia) & set(ib) and set(ia) | set(ib) == set(range(10))
    a.set_epoch(1, skip=2)
    assert a.indices() == ia[2:] and len(a) == 3
    assert next(iter(a)) == (1, ia[2])
    a.set_epoch(2)
    assert a.indices() != ia  # a new permutation each epoch


def test_dataloader_workers_do_not_change_the_run(data: Path, tmp_path: Path) -> None:
    # Augmentation is drawn per (seed, epoch, index), so worker processes (persistent across the
    # 3 epochs of this run) give the very same training as the main process.
    weights = []
    for w in (0, 2):
        cfg = replace(tiny_cfg(data, tmp_path / f"run{w}", steps=7, ckpt_every=0), data={"workers": w})
        tr = Trainer(cfg)
        tr.run()
        weights.append(_params(tr.generator))
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_seeded_pairs_augment_both_images_alike(data: Path) -> None:
    from derestainer.data.datasets import build_dataset

    cfg = tiny_cfg(data, data / "unused")
    base = build_dataset(cfg.data, "train", train=False)
    ds = SeededPairs(base, seed=0, flip=True, rot90=True)
    first = ds[(0, 1)]
    assert torch.equal(first["he"], ds[(0, 1)]["he"])  # a pure function of (seed, epoch, index)
    views = {tuple(ds[(e, 1)]["he"].flatten()[:64].tolist()) for e in range(12)}
    assert len(views) > 1  # epochs draw different augmentations
    # the same geometric transform is applied to both images of the pair
    ref = base[1]
    for e in range(8):
        it = ds[(e, 1)]
        matches = [k for k in range(4) for flip in (False, True)
                   if torch.equal(torch.rot90(ref["he"].flip(-1) if flip else ref["he"], k, (-2, -1)), it["he"])
                   and torch.equal(torch.rot90(ref["ihc"].flip(-1) if flip else ref["ihc"], k, (-2, -1)), it["ihc"])]
        assert matches


def test_sample_grid_layout() -> None:
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    g = sample_grid(x, x, x, padding=2)
    assert g.dtype == torch.uint8 and g.shape == (2 + 3 * 18, 2 + 6 * 18, 3)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_dry_run_prints_resolved_config(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["train", "--config", "tiny", "--set", "train.lr=3e-4", "--data", str(tmp_path),
                                    "--out", str(tmp_path / "r"), "--dry-run"])
    assert res.exit_code == 0, res.output
    import yaml

    d = yaml.safe_load(res.output)
    assert d["train"]["lr"] == 3e-4 and d["data"]["root"] == str(tmp_path) and d["model"]["ngf"] == 8
    assert not (tmp_path / "r").exists()


def test_cli_resume_from_a_checkpoint_uses_its_config_and_run_folder(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_cfg(data, run, steps=2, ckpt_every=2, lr=3e-4))
    ckpt = checkpoint_dir(run, 2)
    # no --config, no --out: not the paper preset, and the checkpoint's own run folder
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt), "--set", "train.steps=3", "--dry-run"])
    assert res.exit_code == 0, res.output
    import yaml

    d = yaml.safe_load(res.output)
    assert d["model"]["ngf"] == 8 and d["train"]["lr"] == 3e-4 and d["train"]["steps"] == 3
    assert d["train"]["out"] == str(run) and d["data"]["root"] == str(data)
    res = CliRunner().invoke(main, ["train", "--resume", str(ckpt), "--set", "train.steps=3"])
    assert res.exit_code == 0, res.output
    assert find_checkpoint(run).name == checkpoint_dir(run, 3).name
    # a path with no checkpoint is a user error
    res = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "nothing"), "--dry-run"])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_cli_reports_user_errors_without_traceback(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["train", "--config", "tiny", "--data", str(tmp_path / "nowhere"),
                                    "--out", str(tmp_path / "r"), "--set", "train.device=cpu"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "nowhere" in res.output
    res = CliRunner().invoke(main, ["train", "--config", "tiny", "--set", "train.nope=1", "--dry-run"])
    assert res.exit_code == 1 and "nope" in res.output


# ---------------------------------------------------------------------------- comparator, autocast
def test_comparator_loss_and_bf16_autocast(data: Path, tmp_path: Path) -> None:
    from derestainer.models.classifier import HER2Classifier, save_classifier

    torch.manual_seed(0)
    save_classifier(tmp_path / "cmp.safetensors", HER2Classifier("tiny"), {"size": 24})
    cfg = tiny_cfg(data, tmp_path / "run", steps=2, ckpt_every=0, log_every=1, amp="bf16",
                   comparator=str(tmp_path / "cmp.safetensors"))
    tr = Trainer(cfg)
    assert tr.amp_dtype == torch.bfloat16 and tr.cmp_size == 24
    frozen = {k: v.clone() for k, v in tr.comparator.state_dict().items()}
    summary = tr.run()
    recs = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    assert len(recs) == 2 and all(np.isfinite(r["cmp"]) and 0 <= r["cmp"] <= 2 for r in recs)
    assert summary["skipped_steps"] == 0
    # the comparator is frozen: neither its weights nor its BatchNorm statistics move
    for k, v in tr.comparator.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # and it is not part of the exported generator
    assert not any(k.startswith("comparator") for k in load_file(tmp_path / "run" / "generator.safetensors"))


@pytest.mark.gpu
def test_cuda_bf16_channels_last_fused_training(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data, tmp_path / "run", steps=4, ckpt_every=2, device="cuda", amp="auto", deterministic=False)
    tr = Trainer(cfg)
    assert tr.amp_dtype == torch.bfloat16 and tr.channels_last
    assert tr.opt_g.defaults["fused"] and next(tr.generator.parameters()).is_cuda
    summary = tr.run()
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert all(np.isfinite(v) for v in summary["losses"].values())
    verify_checkpoint(find_checkpoint(tmp_path / "run"))
    Trainer(cfg, resume="latest")  # loads a CUDA run's checkpoint (optimizer state onto the device)
