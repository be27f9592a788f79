"""The trainer with the options the baselines and the stain-loss variants brought: the moving average of G,
feature matching, label smoothing, a late comparator, the VGG term without weights, the L_H and L_DAB
variants. ``tiny`` at 32 px on a few written pairs, as tests/test_train.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.test_train import tiny_cfg, write_pairs

from derestainer.core.config import replace
from derestainer.core.runs import EMA_FILE, list_checkpoints, resolve_generator_file
from derestainer.training.ema import GeneratorEMA, ema_decay
from derestainer.training.logging import read_jsonl
from derestainer.training.loop import Trainer, train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("bci"), n_train=6, n_test=2)


def test_ema_decay_follows_ema_pytorchs_warm_up() -> None:
    # copies until start + 1, then min(beta, 1 − 1/(1 + k)) for the k-th update after it
    assert [ema_decay(s, 0.99, 100) for s in (1, 100, 101)] == [0.0, 0.0, 0.0]
    assert ema_decay(102, 0.99, 100) == pytest.approx(0.5)
    assert ema_decay(104, 0.99, 100) == pytest.approx(0.75)
    assert ema_decay(10_000, 0.99, 100) == 0.99


def test_ema_update_is_the_moving_average_and_skips_bad_steps() -> None:
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = GeneratorEMA(lin, beta=0.5, start=0)
    values = [3.0, 5.0, 9.0]
    expected = 1.0
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update(lin, step)
        d = ema_decay(step, 0.5, 0)
        expected = d * expected + (1 - d) * v if d > 0 else v
        torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    with torch.no_grad():
        lin.weight.fill_(100.0)
    ema.update(lin, 4, skipped=torch.tensor(True))
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), expected))
    assert not any(p.requires_grad for p in ema.module.parameters())
    # BatchNorm running statistics are averaged too (as ema_pytorch), its batch counter copied
    bn = torch.nn.BatchNorm1d(1)
    ema_bn = GeneratorEMA(bn, beta=0.5, start=0)
    for step, v in enumerate([2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            bn.running_mean.fill_(v)
            bn.num_batches_tracked.fill_(step)
        ema_bn.update(bn, step)
    assert float(ema_bn.module.running_mean) == pytest.approx(0.5 * (0.5 * 2.0 + 0.5 * 4.0) + 0.5 * 8.0)
    assert int(ema_bn.module.num_batches_tracked) == 3
    with pytest.raises(ValueError, match="train.ema"):
        GeneratorEMA(lin, beta=1.0)


def test_ema_run_exports_the_average_and_resumes_it(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data, tmp_path / "run", steps=6, ckpt_every=3, ema=0.9, ema_start=2)
    with Trainer(cfg) as tr:
        tr.run()
        avg = {k: v.clone() for k, v in tr.ema.module.state_dict().items()}  # type: ignore[union-attr]
        raw = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    exported = load_file(str(tmp_path / "run" / "generator.safetensors"))
    key = next(k for k, v in raw.items() if v.is_floating_point() and v.dim() == 4)
    torch.testing.assert_close(exported[key], avg[key])
    assert not torch.equal(avg[key], raw[key])  # the average lags the trained weights
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert (ckpt / EMA_FILE).is_file() and resolve_generator_file(ckpt) == ckpt / EMA_FILE
    torch.testing.assert_close(load_file(str(ckpt / "generator.safetensors"))[key], raw[key])

    from derestainer.core.errors import CheckpointError
    from derestainer.training.state import verify_checkpoint

    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(ckpt, broken)
    (broken / EMA_FILE).unlink()
    with pytest.raises(CheckpointError, match="moving average"):
        verify_checkpoint(broken)

    # interrupted at step 3 and resumed: the same average at step 6 as the uninterrupted run
    part = tiny_cfg(data, tmp_path / "resumed", steps=3, ckpt_every=3, ema=0.9, ema_start=2)
    train(part)
    summary = train(replace(part, train={"steps": 6}), resume="latest")
    assert summary["steps"] == 6 and summary["ema"] == 0.9
    resumed = load_file(str(tmp_path / "resumed" / "generator.safetensors"))
    torch.testing.assert_close(resumed[key], avg[key])


def test_feature_matching_smoothing_and_the_variants_train(data: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(data, tmp_path / "run", steps=4, log_every=1, ckpt_every=0)
    cfg = replace(cfg, loss={"fm": 10.0, "gan_smooth": 0.1, "h_mode": "infonce", "dab_mode": "od"})
    summary = train(cfg)
    recs = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    assert len(recs) == 4
    for term in ("fm", "h", "dab", "h_spread", "gan", "d"):
        vals = [r[term] for r in recs]
        assert all(np.isfinite(vals)), term
    assert all(r["fm"] > 0 for r in recs)
    assert {"fm", "h", "dab"} <= set(summary["active_terms"])


def test_simsiam_needs_its_predictor_and_trains_with_it(data: Path, tmp_path: Path) -> None:
    from derestainer.core.errors import ConfigError

    with pytest.raises(ConfigError, match="h_predictor"):  # refused with the config, before anything is written
        replace(tiny_cfg(data, tmp_path / "a", steps=2, ckpt_every=0), loss={"h_mode": "simsiam"})
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="focal_alpha"):
        replace(tiny_cfg(data, tmp_path / "a", steps=2, ckpt_every=0), loss={"focal_alpha": [1.0, 2.0]})
    cfg = replace(tiny_cfg(data, tmp_path / "b", steps=2, ckpt_every=0), loss={"h_mode": "simsiam"},
                  model={"h_predictor": 16})
    assert np.isfinite(train(cfg)["losses"]["h"])


def test_vgg_term_without_weights_is_off_and_said(data: Path, tmp_path: Path) -> None:
    cfg = replace(tiny_cfg(data, tmp_path / "run", steps=2, ckpt_every=0), loss={"vgg": 10.0})
    summary = train(cfg)
    assert "vgg" not in summary["active_terms"] and "vgg_weights" in summary["terms_off"]["vgg"]
    events = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r.get("event") == "warning"]
    assert any("VGG" in r["message"] for r in events)


def test_comparator_term_starts_late(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from derestainer.models.classifier import HER2Classifier, save_classifier

    clf = tmp_path / "clf.safetensors"
    torch.manual_seed(0)
    save_classifier(clf, HER2Classifier(arch="tiny"), {"size": 32})
    cfg = tiny_cfg(data, tmp_path / "run", steps=4, log_every=1, ckpt_every=0, comparator=str(clf))
    summary = train(replace(cfg, loss={"cmp_start": 0.5}))
    recs = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["kind"] == "train"]
    assert ["cmp" in r for r in recs] == [False, False, True, True]
    assert "cmp" in summary["active_terms"]


def test_warmup_fraction_is_a_share_of_the_steps() -> None:
    from derestainer.core.config import TrainConfig, load_config
    from derestainer.training.schedule import lr_factor, warmup_steps

    assert warmup_steps(TrainConfig(steps=300, warmup_fraction=1 / 3)) == 100
    assert warmup_steps(TrainConfig(steps=300, warmup_steps=7, warmup_fraction=0.5)) == 7  # steps win
    tc = load_config("bcistainer", ["train.steps=300"]).train
    w = warmup_steps(tc)
    # BCIStainer: linear warm-up over the first third, then cosine from the full rate to 0
    factors = [lr_factor(k, 300, tc.lr_schedule, tc.lr_decay_start, w) for k in (0, 49, 99, 100, 200, 299)]
    assert factors[:3] == pytest.approx([1 / 100, 50 / 100, 1.0])
    assert factors[3] == pytest.approx(1.0) and factors[4] == pytest.approx(0.5) and factors[5] < 1e-3


@pytest.mark.parametrize("preset, overrides", [
    ("paper", []), ("no_stain", []), ("no_dab", []), ("h_infonce", []), ("h_infonce", ["model.h_embed_dim=8"]),
    ("h_simsiam", []), ("paper", ["model.h_predictor=8"]), ("dab_od", []), ("bcistainer", []),
    ("bcistainer", ["loss.level=0"]), ("bcistainer", ["loss.lowres=0"]), ("asp", []), ("asp", ["loss.nce=0", "loss.asp=0"]),
    ("pix2pix", []), ("pix2pixhd", []),
])
def test_unused_parameters_are_declared_for_ddp(preset: str, overrides: list[str], data: Path, tmp_path: Path) -> None:
    # DDP without find_unused_parameters fails when a parameter gets no gradient: after one real step, every
    # configuration in which some generator parameter has no gradient must say so.
    from derestainer.core.presets import compose_model_config
    from derestainer.training.setup import has_unused_parameters

    small = ["model.ngf=8", "model.ndf=8", "model.d_layers=2", "model.n_fusion_blocks=6" if preset == "asp" else
             "model.n_fusion_blocks=2"]
    cfg = compose_model_config(preset, "tiny", small + overrides)
    base = tiny_cfg(data, tmp_path / "run", steps=1, ckpt_every=0)
    cfg = replace(cfg, data={"root": str(data), "size": 64, "val_split": "test"}, train={**base.train.__dict__})
    with Trainer(cfg) as tr:
        tr.train_step([next(tr._batches())])
        no_grad = [n for n, p in tr.generator.named_parameters() if p.grad is None]
        flagged = has_unused_parameters(tr.generator, tr.active, cfg.loss)
    assert flagged or not no_grad, f"{preset} {overrides}: no gradient for {no_grad[:4]} but not declared"


def test_feature_matching_alone_still_trains_a_discriminator(data: Path, tmp_path: Path) -> None:
    cfg = replace(tiny_cfg(data, tmp_path / "run", steps=2, log_every=1, ckpt_every=0), loss={"gan": 0.0, "fm": 10.0})
    summary = train(cfg)
    assert "fm" in summary["losses"] and "d" in summary["losses"] and "gan" not in summary["losses"]
