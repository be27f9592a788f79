"""Patch/folder translation, test-time augmentation, checkpoint resolution and export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from derestainer.cli import main
from derestainer.core.config import load_config, replace
from derestainer.core.errors import CheckpointError
from derestainer.core.fileformat import read_meta, save_tensors
from derestainer.core.ranges import signed_to_uint8, uint8_to_signed
from derestainer.core.runs import resolve_generator_file
from derestainer.inference.folders import collect_inputs
from derestainer.inference.loading import load_model
from derestainer.inference.prediction import (
    dihedral,
    inverse_dihedral,
    pad_to_multiple,
    predict,
    resize_batch,
    translate_array,
)
from derestainer.models.base import GenOutput
from derestainer.models.files import load_generator, save_generator
from derestainer.models.registry import register_generator

# --------------------------------------------------------------------------------------------------
# Tiny test generators (registered under names no real model uses)


class _Conv3(nn.Module):
    """Three reflect-padded 3×3 convs + a pooled level head: fully convolutional, not rotation-equivariant."""

    size_multiple = 4

    def __init__(self, head: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
        )
        self.head = nn.Linear(3, 4) if head else None

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        if he.shape[-1] % self.size_multiple or he.shape[-2] % self.size_multiple:
            raise ValueError(f"size {tuple(he.shape[-2:])} not a multiple of {self.size_multiple}")
        y = self.body(he)
        logits = self.head(he.mean(dim=(2, 3))) if self.head is not None else None
        return GenOutput(ihc=y, level_logits=logits)


class _Pointwise(nn.Module):
    """A 1×1 conv: commutes with every flip and rotation (its level head pools: invariant)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 4)

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        return GenOutput(ihc=torch.tanh(self.conv(he)), level_logits=self.head(he.mean(dim=(2, 3))))


register_generator("_tt_conv3")(lambda mc: _Conv3(head=True))
register_generator("_tt_conv3_nohead")(lambda mc: _Conv3(head=False))
register_generator("_tt_pointwise")(lambda mc: _Pointwise())


def _save(path: Path, name: str, seed: int = 0, extra: dict | None = None) -> Path:
    cfg = replace(load_config("tiny"), model={"name": name})
    torch.manual_seed(seed)
    from derestainer.models.registry import create_generator

    model = create_generator(cfg.model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return save_generator(path, model, cfg, extra=extra)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    return _save(tmp_path / "model.safetensors", "_tt_conv3")


# --------------------------------------------------------------------------------------------------
# Pure helpers


def test_dihedral_group() -> None:
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    seen = set()
    for k in range(8):
        y = dihedral(x, k)
        assert torch.equal(inverse_dihedral(y, k), x)
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) == 8  # eight distinct symmetries


@pytest.mark.parametrize("h,w", [(37, 50), (8, 8), (3, 5)])
def test_pad_to_multiple(h: int, w: int) -> None:
    x = torch.randn(1, 3, h, w)
    y, (oh, ow) = pad_to_multiple(x, 8, min_size=16)
    assert (oh, ow) == (h, w)
    assert y.shape[-2] % 8 == 0 and y.shape[-1] % 8 == 0 and y.shape[-2] >= 16 and y.shape[-1] >= 16
    assert torch.equal(y[..., :h, :w], x)
    if y.shape[-2] - h < h and y.shape[-1] - w < w:  # reflection where the image is large enough
        assert torch.equal(y[..., h, :w], x[..., h - 2, :])


def test_tta_equals_plain_for_an_equivariant_model_and_not_otherwise(tmp_path: Path) -> None:
    x = torch.rand(2, 3, 24, 32) * 2 - 1
    pw = load_model(_save(tmp_path / "pw.safetensors", "_tt_pointwise"), "cpu")
    plain, p_plain = predict(pw.model, x, multiple=pw.multiple)
    tta, p_tta = predict(pw.model, x, multiple=pw.multiple, tta=True)
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(p_tta, p_plain, atol=1e-6, rtol=0)

    cv = load_model(_save(tmp_path / "cv.safetensors", "_tt_conv3"), "cpu")
    plain, _ = predict(cv.model, x, multiple=cv.multiple)
    tta, _ = predict(cv.model, x, multiple=cv.multiple, tta=True)
    assert tta.shape == plain.shape == x.shape
    assert (tta - plain).abs().max() > 1e-3
    # TTA really is the mean of the back-transformed outputs.
    ref = torch.stack([inverse_dihedral(cv.model(dihedral(x, k)).ihc, k) for k in range(8)]).mean(0)
    torch.testing.assert_close(tta, ref, atol=1e-6, rtol=0)


def test_translate_array_keeps_size_and_resizes_by_mpp(model_file: Path, rng: np.random.Generator) -> None:
    lm = load_model(model_file, "cpu")
    assert lm.multiple == 4 and lm.mpp == pytest.approx(3.68) and lm.level_names == ("0", "1+", "2+", "3+")
    im = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    out, probs = translate_array(lm, [im, im])
    assert out[0].shape == im.shape and out[0].dtype == np.uint8
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # Inputs at twice the resolution: shrunk to round(h/2) × round(w/2) for the model, output resized back.
    seen: list[tuple[int, ...]] = []
    hook = lm.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        half, _ = translate_array(lm, [im], input_mpp=lm.mpp / 2)
    finally:
        hook.remove()
    assert half[0].shape == im.shape
    assert seen == [(20, 28)]  # 37 × 50 → 18 × 25 (round(h·f)), then padded to multiples of 4
    x = uint8_to_signed(torch.from_numpy(im.transpose(2, 0, 1).copy())[None])
    small = resize_batch(x, (round(37 * 0.5), round(50 * 0.5)))
    assert tuple(small.shape[-2:]) == (18, 25)
    ihc, _ = predict(lm.model, small, multiple=lm.multiple)
    at_model = signed_to_uint8(ihc)[0].permute(1, 2, 0).numpy()
    # back to the input's size exactly as the evaluation resizes: PIL bicubic on the uint8 image
    ref = np.asarray(Image.fromarray(at_model).resize((50, 37), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(half[0], ref)
    kept, _ = translate_array(lm, [im], input_mpp=lm.mpp / 2, output_size="model")
    np.testing.assert_array_equal(kept[0], at_model)
    assert not np.array_equal(half[0], out[0])


def test_resize_by_mpp_with_a_per_pixel_model_gives_the_input_back(tmp_path: Path) -> None:
    """A per-pixel model (1×1 conv + tanh) nearly commutes with resizing: on a smooth image the mpp path ≈ the model at full size."""
    lm = load_model(_save(tmp_path / "pw.safetensors", "_tt_pointwise"), "cpu", precision="fp32")
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float64)
    im = np.stack([60 + 2 * xx, 40 + 3 * yy, 200 - xx - yy], axis=-1).round().astype(np.uint8)
    out, _ = translate_array(lm, [im], input_mpp=lm.mpp / 2)
    with torch.no_grad():
        x = uint8_to_signed(torch.from_numpy(im.transpose(2, 0, 1).copy())[None])
        direct = signed_to_uint8(lm.model(x).ihc)[0].permute(1, 2, 0).numpy()
    inner = (slice(4, -4), slice(4, -4))  # away from the borders, where bilinear resizing clamps
    assert np.abs(out[0][inner].astype(int) - direct[inner].astype(int)).max() <= 2


def test_predict_leaves_precision_to_an_inference_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path applies its own precision: predict adds no autocast around it and refuses a conflicting one."""
    from derestainer.inference import prediction

    f = _save(tmp_path / "cv.safetensors", "_tt_conv3")
    fast = load_model(f, "cpu", precision="fp32")
    plain = load_model(f, "cpu", fast=False)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    calls: list[str] = []
    real = prediction.autocast_context

    def spy(device: torch.device, precision: str = "auto"):
        calls.append(precision)
        return real(device, precision)

    monkeypatch.setattr(prediction, "autocast_context", spy)
    a, _ = predict(fast.model, x, multiple=fast.multiple)
    b, _ = predict(fast.model, x, multiple=fast.multiple, precision="fp32")
    assert calls == []  # no outer autocast around the InferenceModel
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="built to run in 'fp32'"):
        predict(fast.model, x, multiple=fast.multiple, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        predict(fast.model, x, multiple=fast.multiple, precision="fp16")
    predict(plain.model, x, multiple=plain.multiple, precision="fp32")
    assert calls == ["fp32"]  # the plain model still runs under predict's autocast context
    assert prediction.resolved_precision(plain.model, torch.device("cpu"), "auto") == "fp32"
    assert prediction.resolved_precision(plain.model, torch.device("cuda"), "auto") == "bf16"
    assert prediction.resolved_precision(fast.model, torch.device("cpu"), "auto") == "fp32"


# --------------------------------------------------------------------------------------------------
# Folders and the CLI


def _make_inputs(root: Path, rng: np.random.Generator) -> dict[str, tuple[int, int]]:
    sizes = {"a.png": (40, 56), "b.jpg": (37, 50), "sub/c.png": (40, 56), "sub/deeper/d.tif": (33, 33)}
    for rel, (h, w) in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    return sizes


def test_translate_folder_cli(tmp_path: Path, model_file: Path, rng: np.random.Generator) -> None:
    sizes = _make_inputs(tmp_path / "in", rng)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["translate", "--checkpoint", str(model_file), str(tmp_path / "in"),
                                    "--out", str(out), "--batch-size", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for rel, (h, w) in sizes.items():
        png = out / Path(rel).with_suffix(".png")
        assert png.is_file(), png
        assert np.asarray(Image.open(png)).shape == (h, w, 3)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["output"] for r in rows] == sorted(Path(r).with_suffix(".png").as_posix() for r in sizes)
    for r in rows:
        p = [float(r[f"p_{n}"]) for n in ("0", "1+", "2+", "3+")]
        assert sum(p) == pytest.approx(1.0, abs=1e-5)
        assert r["level"] == ("0", "1+", "2+", "3+")[int(np.argmax(p))]
    js = json.loads((out / "predictions.json").read_text())
    assert js["has_level_head"] and len(js["images"]) == 4 and js["model_mpp"] == pytest.approx(3.68)
    assert js["images"][0]["probabilities"]["0"] == pytest.approx(float(rows[0]["p_0"]), abs=1e-5)

    # Batched output equals one-by-one output (batching must not change results).
    lm = load_model(model_file, "cpu")
    single, _ = translate_array(lm, [np.asarray(Image.open(tmp_path / "in" / "a.png"))])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), single[0])


def test_translate_without_level_head_and_single_files(tmp_path: Path, rng: np.random.Generator) -> None:
    sizes = _make_inputs(tmp_path / "in", rng)
    mf = _save(tmp_path / "nohead.safetensors", "_tt_conv3_nohead")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["translate", "-m", str(mf), str(tmp_path / "in" / "a.png"),
                                    str(tmp_path / "in" / "sub" / "c.png"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "a.png").is_file() and (out / "c.png").is_file()
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert all(r["level"] == "" and r["p_0"] == "" for r in rows)
    assert not json.loads((out / "predictions.json").read_text())["has_level_head"]
    assert len(sizes) == 4


def test_collect_inputs_rules(tmp_path: Path, rng: np.random.Generator) -> None:
    _make_inputs(tmp_path / "in", rng)
    flat = collect_inputs([tmp_path / "in"], recursive=False)
    assert sorted(j.rel.as_posix() for j in flat) == ["a.png", "b.png"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / "a.jpg")
    with pytest.raises(ValueError, match="both be written"):
        collect_inputs([tmp_path / "in"])
    with pytest.raises(FileNotFoundError):
        collect_inputs([tmp_path / "missing"])


def test_translate_cli_errors(tmp_path: Path, model_file: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["translate", "-m", str(model_file), str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "bad.png" in res.output and "Traceback" not in res.output
    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(good)
    res = CliRunner().invoke(main, ["translate", "-m", str(tmp_path / "nope"), str(good), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no such model" in res.output
    assert not (tmp_path / "o").exists()  # every input is checked before anything is written


# --------------------------------------------------------------------------------------------------
# Checkpoints and export


def _fake_run(root: Path, model_file: Path) -> Path:
    """A run folder as the trainer lays it out: checkpoints/step-N/{generator.safetensors,state.json}, latest."""
    for step in (10, 20):
        ck = root / "checkpoints" / f"step-{step:07d}"
        ck.mkdir(parents=True)
        _save(ck / "generator.safetensors", "_tt_conv3", seed=step, extra={"step": step})
        (ck / "state.json").write_text("{}")
    (root / "latest").write_text("checkpoints/step-0000010\n")
    return root


def test_resolve_checkpoint(tmp_path: Path, model_file: Path) -> None:
    assert resolve_generator_file(model_file) == model_file
    run = _fake_run(tmp_path / "run", model_file)
    ck = run / "checkpoints" / "step-0000020"
    assert resolve_generator_file(ck) == ck / "generator.safetensors"
    assert resolve_generator_file(run) == run / "checkpoints" / "step-0000010" / "generator.safetensors"  # latest pointer
    (run / "latest").unlink()
    assert resolve_generator_file(run) == ck / "generator.safetensors"  # newest
    _save(run / "generator.safetensors", "_tt_conv3")
    assert resolve_generator_file(run) == run / "generator.safetensors"  # finished run
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no generator.safetensors"):
        resolve_generator_file(tmp_path / "empty")


def test_export_round_trip(tmp_path: Path, model_file: Path) -> None:
    run = _fake_run(tmp_path / "run", model_file)
    out = tmp_path / "exported.safetensors"
    res = CliRunner().invoke(main, ["export", "--checkpoint", str(run / "checkpoints" / "step-0000020"),
                                    "--out", str(out), "--mpp", "0.5"])
    assert res.exit_code == 0, res.output
    meta = read_meta(out)
    assert meta["kind"] == "generator" and meta["mpp"] == 0.5 and meta["size"] == 64 and meta["step"] == 20
    assert meta["config"]["data"]["mpp"] == 0.5 and meta["config"]["model"]["name"] == "_tt_conv3"
    src_model, _, _ = load_generator(run / "checkpoints" / "step-0000020" / "generator.safetensors")
    exp_model, _, _ = load_generator(out)
    for (k, a), (k2, b) in zip(src_model.state_dict().items(), exp_model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(src_model(x).ihc, exp_model(x).ihc)
    assert load_model(out, "cpu").mpp == 0.5
    # Without --mpp the training resolution is kept.
    res = CliRunner().invoke(main, ["export", "-m", str(run), "--out", str(tmp_path / "e2.safetensors")])
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "e2.safetensors")["mpp"] == pytest.approx(3.68)
    # --training-mpp is --mpp's name that says which µm/px it is
    res = CliRunner().invoke(main, ["export", "-m", str(run), "--out", str(tmp_path / "e3.safetensors"), "--training-mpp", "0.5"])
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "e3.safetensors")["mpp"] == 0.5


def test_translate_out_must_be_a_folder(tmp_path: Path, model_file: Path, rng: np.random.Generator) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img)
    res = CliRunner().invoke(main, ["translate", str(img), "-m", str(model_file), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [f"Error: --out {tmp_path / 'x.png'}: a folder is expected (one PNG per "
                                               "input is written there, with predictions.csv); give a folder name"]
    assert not (tmp_path / "x.png").exists()
    # --input-mpp (alias --mpp): the inputs' µm/px; the same outputs under either name
    for opt, out in (("--input-mpp", "o1"), ("--mpp", "o2")):
        res = CliRunner().invoke(main, ["translate", str(img), "-m", str(model_file), "--out", str(tmp_path / out), opt, "1.84"])
        assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o1" / "a.png")), np.asarray(Image.open(tmp_path / "o2" / "a.png")))


def test_wrong_kind_gives_a_clear_error(tmp_path: Path) -> None:
    clf = save_tensors(tmp_path / "classifier.safetensors", {"w": torch.zeros(2)}, {"kind": "classifier"})
    for args in (["export", "-m", str(clf), "--out", str(tmp_path / "x.safetensors")],
                 ["translate", "-m", str(clf), str(clf), "--out", str(tmp_path / "o")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1, res.output
        assert "classifier checkpoint, expected a generator" in res.output and "Traceback" not in res.output
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(main, ["export", "-m", str(junk), "--out", str(tmp_path / "y.safetensors")])
    assert res.exit_code == 1 and "junk.safetensors" in res.output
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_real_derestainer_model_translates(tmp_path: Path, rng: np.random.Generator) -> None:
    # The real generator (tiny width) through the same path: odd sizes are padded and cropped back.
    from derestainer.models.registry import create_generator

    cfg = load_config("tiny")
    torch.manual_seed(0)
    f = save_generator(tmp_path / "drs.safetensors", create_generator(cfg.model).eval(), cfg)
    lm = load_model(f, "cpu")
    assert lm.multiple == 2 ** cfg.model.n_down
    out, probs = translate_array(lm, [rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)], tta=True)
    assert out[0].shape == (30, 45, 3) and probs.shape == (1, cfg.model.n_levels)


def test_fast_path_is_the_default_and_agrees_with_the_plain_model(tmp_path: Path, rng: np.random.Generator) -> None:
    """load_model's fast path (BN folded, channels_last) gives the plain model's translation in fp32,
    and stays within 2 grey levels in bf16."""
    from derestainer.inference.optimize import InferenceModel
    from derestainer.models.registry import create_generator

    cfg = load_config("tiny")
    torch.manual_seed(1)
    g = create_generator(cfg.model)
    g.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding has something to fold
        for _ in range(3):
            g(torch.rand(4, 3, 64, 64) * 2 - 1)
    f = save_generator(tmp_path / "g.safetensors", g.eval(), cfg)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    plain = load_model(f, "cpu", fast=False)
    assert not isinstance(plain.model, InferenceModel)
    fast = load_model(f, "cpu", precision="fp32")
    assert isinstance(fast.model, InferenceModel)
    ref, p_ref = translate_array(plain, imgs, precision="fp32")
    out, p_out = translate_array(fast, imgs, precision="fp32")
    for a, b in zip(ref, out):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.allclose(p_ref, p_out, atol=1e-4)
    bf = load_model(f, "cpu", precision="bf16")
    out16, _ = translate_array(bf, imgs, precision="bf16")
    for a, b in zip(ref, out16):
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 2
