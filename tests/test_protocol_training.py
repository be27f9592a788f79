"""Protocol hygiene of the translation trainer: fp32 stain separation under autocast, a validation
split carved from the training files, and learning-rate schedules (closed forms, resume-exact)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from derestainer.core.config import DataConfig, TrainConfig, from_dict, load_config, replace
from derestainer.core.errors import ConfigError
from derestainer.data.datasets import PairedImageDataset
from derestainer.losses import dab_l1_loss
from derestainer.models.destainer import StainSeparation
from derestainer.models.registry import create_generator
from derestainer.stain import stain_channel
from derestainer.training.logging import read_jsonl
from derestainer.training.loop import Trainer
from derestainer.training.schedule import lr_factor
from derestainer.training.setup import VAL_FILES, holdout_split
from test_train import one_thread, tiny_cfg, write_pairs  # noqa: F401  (one_thread: the autouse fixture, here too)

RTOL = 1e-5


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------ stain separation in fp32
@pytest.mark.parametrize("bf16_inputs", [False, True])
def test_stain_terms_under_autocast_equal_fp32(bf16_inputs: bool) -> None:
    fake, real = _images(seed=1), _images(seed=2)
    if bf16_inputs:  # the reference is the same (bf16-valued) input in fp32
        fake, real = fake.bfloat16(), real.bfloat16()
    sep = StainSeparation()
    ref_dab = dab_l1_loss(fake.float(), real.float())
    ref_h = sep(fake.float(), "h")
    unit = ((fake.float() + 1) / 2).to(fake.dtype)
    ref_fn = stain_channel(unit.float(), "h")
    with _bf16():
        got_dab = dab_l1_loss(fake, real)
        got_h = sep(fake, "h")
        got_fn = stain_channel(unit, "h")
    for got, ref in ((got_dab, ref_dab), (got_h, ref_h), (got_fn, ref_fn)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-6)
    # the previous behaviour for comparison: the same einsum in bf16 is visibly off
    with _bf16():
        m = sep.hed_from_rgb
        od = torch.log(((fake.float() + 1) / 2).clamp_min(1e-6))
        assert torch.einsum("nchw,cd->ndhw", od, m).dtype == torch.bfloat16


def test_generator_forward_stain_terms_under_autocast() -> None:
    torch.manual_seed(0)
    g = create_generator(load_config("tiny").model).eval()
    he, ihc = _images(seed=3), _images(seed=4)
    with torch.no_grad():
        with _bf16():
            out = g(he, ihc)
            fake = out.ihc
            h_in = g.destainer.encoder_in(he)  # the encoder's H-channel input (and L_H's, for the IHC)
            dab = dab_l1_loss(fake, ihc)
            h_img = g.stain_image(fake, "h")
        assert h_in.dtype == torch.float32 and h_img.dtype == torch.float32
        torch.testing.assert_close(h_in, g.destainer.encoder_in(he), rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(dab, dab_l1_loss(fake.float(), ihc), rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(h_img, g.stain_image(fake.float(), "h"), rtol=RTOL, atol=1e-6)


def test_float64_stays_float64() -> None:
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    assert stain_channel(x, "dab").dtype == torch.float64


# ------------------------------------------------------------------------ validation split
def _fake_data(names: list[str]) -> PairedImageDataset:
    return PairedImageDataset([(n, f"{n}.png", f"{n}.png") for n in names], [-1] * len(names))


def test_holdout_split_by_file_deterministic_and_order_free() -> None:
    names = [f"{i:04d}" for i in range(50)]
    keep, held = holdout_split(_fake_data(names), 0.1, 0)
    assert len(held) == 5 and sorted(keep + held) == list(range(50)) and not set(keep) & set(held)
    shuffled = list(np.random.default_rng(1).permutation(names))
    _, h2 = holdout_split(_fake_data(shuffled), 0.1, 0)
    assert {shuffled[i] for i in h2} == {names[i] for i in held}  # same files, whatever the listing order
    assert holdout_split(_fake_data(names), 0.1, 1)[1] != held  # the seed matters
    assert len(holdout_split(_fake_data(names[:2]), 0.01, 0)[1]) == 1  # at least one file
    assert holdout_split(_fake_data(names[:1]), 0.5, 0)[1] == []
    assert holdout_split(_fake_data(names), 0.0, 0) == (list(range(50)), [])


def test_val_config_checks() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="val_fraction") as ei:
            from_dict({"val_fraction": bad}, DataConfig, "data.")
        assert "\n" not in str(ei.value)
    assert DataConfig().val_split == "" and DataConfig().val_fraction == 0.1


def test_trainer_holds_out_training_files_and_resume_keeps_them(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "bci", n_train=10, n_test=2)
    cfg = replace(tiny_cfg(data, tmp_path / "run", steps=2, ckpt_every=2), data={"val_split": "", "val_fraction": 0.2})
    with Trainer(cfg) as tr:
        held = list(tr.val_files or [])
        assert len(held) == 2 and len(tr.train_set) == 8  # type: ignore[arg-type]
        assert set(held).isdisjoint(tr.train_set.base.names)  # never used for training
        assert sorted(tr.val_set.names) == sorted(held)  # type: ignore[union-attr]
        assert all("_test_" not in n for n in held)  # from the training split, not the test split
        assert {it["name"] for it in tr.sample_items} <= set(held)
        summary = tr.run()
    assert (tmp_path / "run" / VAL_FILES).read_text().split() == held
    assert summary["validation_set"] == {"held_out_of": "train", "files": 2, "list": VAL_FILES}
    cfg2 = replace(cfg, train={"steps": 3})
    with Trainer(cfg2, resume="latest") as tr2:
        assert tr2.state.step == 2 and tr2.val_files == held


def test_explicit_test_split_warns(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "bci", n_train=4, n_test=2)
    cfg = replace(tiny_cfg(data, tmp_path / "run", steps=0), data={"val_split": "test"})
    with Trainer(cfg) as tr:
        assert tr.val_files is None and len(tr.val_set) == 2 and len(tr.train_set) == 4  # type: ignore[arg-type]
    log = read_jsonl(tmp_path / "run" / "log.jsonl")
    assert any("test split" in str(r.get("message", "")) for r in log)


# ------------------------------------------------------------------------ learning-rate schedules
def test_lr_factor_closed_forms() -> None:
    T = 100
    for k in (0, 10, 49, 99):
        assert lr_factor(k, T, "constant") == 1.0
    assert lr_factor(0, T, "linear") == 1.0
    assert lr_factor(25, T, "linear") == pytest.approx(0.75)
    assert lr_factor(99, T, "linear") == pytest.approx(0.01)
    # pix2pix: hold for the first half, then linearly to zero
    assert lr_factor(49, T, "linear", 0.5) == 1.0
    assert lr_factor(50, T, "linear", 0.5) == 1.0
    assert lr_factor(75, T, "linear", 0.5) == pytest.approx(0.5)
    assert lr_factor(99, T, "linear", 0.5) == pytest.approx(1 / 50)
    assert lr_factor(50, T, "cosine") == pytest.approx(0.5)
    assert lr_factor(25, T, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(60, T, "cosine", 0.2) == pytest.approx(0.5)
    # warm-up: (k + 1) / W up to W, times the decay
    assert lr_factor(0, T, "constant", 0, 10) == pytest.approx(0.1)
    assert lr_factor(4, T, "constant", 0, 10) == pytest.approx(0.5)
    assert lr_factor(9, T, "constant", 0, 10) == 1.0
    assert lr_factor(4, T, "linear", 0, 10) == pytest.approx(0.5 * 0.96)
    assert lr_factor(5, T, "linear", 1.0) == 1.0  # decay_start 1: constant


@pytest.mark.parametrize(("key", "value"), [("lr_schedule", "step"), ("lr_decay_start", 1.5),
                                            ("lr_decay_start", -0.1), ("warmup_steps", -1)])
def test_lr_config_checks(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"train.{key}") as ei:
        from_dict({key: value}, TrainConfig, "train.")
    assert "\n" not in str(ei.value)


def test_presets_take_their_authors_schedule() -> None:
    assert load_config("paper").train.lr_schedule == "constant"
    for name in ("pix2pix", "pyramidpix2pix", "pix2pixhd"):
        tc = load_config(name).train
        assert (tc.lr_schedule, tc.lr_decay_start) == ("linear", 0.5), name


def _lrs(tmp_path: Path, name: str) -> list[tuple[int, float]]:
    recs = read_jsonl(tmp_path / name / "log.jsonl")
    return [(r["step"], r["lr"]) for r in recs if r["kind"] == "train"]


def test_resumed_run_continues_the_schedule_exactly(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "bci", n_train=4, n_test=0)
    sched = {"lr_schedule": "linear", "lr_decay_start": 0.25, "warmup_steps": 2, "log_every": 1, "lr": 1e-3,
             "d_lr": 2e-3}
    full = tiny_cfg(data, tmp_path / "full", steps=4, ckpt_every=2, **sched)
    with Trainer(full) as tr:
        tr.run()
        d_final = tr.opt_d.param_groups[0]["lr"]  # type: ignore[union-attr]
    # the same 4-step run, interrupted after its step-2 checkpoint, then resumed
    half = replace(full, train={"out": str(tmp_path / "half")})
    calls = {"n": 0}
    real_step = Trainer.train_step

    def crash_at_third(self: Trainer, batches: list) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", crash_at_third)
        with Trainer(half) as tr, pytest.raises(KeyboardInterrupt):
            tr.run()
    with Trainer(half, resume="latest") as tr:
        assert tr.state.step == 2
        tr.run()
        assert tr.opt_d.param_groups[0]["lr"] == d_final  # type: ignore[union-attr]
    expect = [(k + 1, 1e-3 * lr_factor(k, 4, "linear", 0.25, 2)) for k in range(4)]
    assert _lrs(tmp_path, "full") == pytest.approx(expect)
    assert _lrs(tmp_path, "half") == pytest.approx(expect)
    assert d_final == pytest.approx(2e-3 * lr_factor(3, 4, "linear", 0.25, 2))
