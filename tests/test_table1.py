"""A Table 1 you can trust: one resize path, bootstrap intervals, self-match rate, paired differences."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from derestainer.core.config import load_config
from derestainer.core.errors import ConfigError, EvaluationError
from derestainer.core.resample import FILTERS, resize_rgb
from derestainer.evaluation import evaluate
from derestainer.inference.folders import collect_inputs, translate_files
from derestainer.inference.loading import load_model
from derestainer.metrics import bootstrap
from derestainer.models.files import save_generator
from derestainer.models.registry import create_generator

# ---------------------------------------------------------------------------------------------- the one resize


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_resize_rgb_is_pillow_with_the_named_filter(name: str, rng: np.random.Generator) -> None:
    im = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(im).resize((64, 48), FILTERS[name]))
    np.testing.assert_array_equal(resize_rgb(im, (48, 64), name), ref)
    assert resize_rgb(im, (24, 32), name) is im  # same size: untouched


def test_resize_rgb_refuses_unknown_filters_and_distortions(rng: np.random.Generator) -> None:
    im = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    with pytest.raises(ConfigError, match="unknown resize filter 'cubic'"):
        resize_rgb(im, (48, 64), "cubic")
    with pytest.raises(ValueError, match="aspect ratio differs"):
        resize_rgb(im, (64, 64))
    # one pixel of rounding per side is not a distortion: 50 x 37 made at half size is 25 x 18
    assert resize_rgb(rng.integers(0, 256, (18, 25, 3), dtype=np.uint8), (37, 50)).shape == (37, 50, 3)
    with pytest.raises(ValueError, match="aspect ratio differs"):  # 2 px off at 8 px: a distortion, not rounding
        resize_rgb(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (8, 10))


def _tiny_model(path: Path, size: int) -> Path:
    cfg = load_config("tiny")
    cfg = replace(cfg, data=replace(cfg.data, size=size, mpp=2.0))
    torch.manual_seed(0)
    return save_generator(path, create_generator(cfg.model), cfg)


def _bci_pairs(root: Path, rng: np.random.Generator, n: int = 4, size: int = 64) -> tuple[Path, Path]:
    he, gt = root / "HE" / "test", root / "IHC" / "test"
    he.mkdir(parents=True)
    gt.mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        level = ("0", "1+", "2+", "3+")[i % 4]
        base = np.stack([120 + 60 * np.sin(xx / (3 + i)), 90 + 50 * np.cos(yy / 4), 160 + 0 * xx], -1)
        noise = rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(he / f"{i:05d}_test_{level}.png")
        Image.fromarray(np.clip(255 - base / 2 + noise, 0, 255).astype(np.uint8)).save(gt / f"{i:05d}_test_{level}.png")
    return he, gt


def test_every_route_to_the_pixel_metrics_gives_the_same_numbers(tmp_path: Path, rng: np.random.Generator) -> None:
    """translate at the model's size + evaluate's resize = translate back to the input's size = the benchmark's stage."""
    from derestainer.benchmark import stages

    he, gt = _bci_pairs(tmp_path / "data", rng)
    model = _tiny_model(tmp_path / "g.safetensors", size=32)
    lm = load_model(model, "cpu", precision="fp32")
    jobs = collect_inputs([he], recursive=False)
    mpp = lm.mpp * lm.size / 64  # the 64 px inputs are at twice the model's resolution
    translate_files(lm, jobs, tmp_path / "at_model", input_mpp=mpp, precision="fp32", output_size="model")
    translate_files(lm, jobs, tmp_path / "at_input", input_mpp=mpp, precision="fp32", output_size="input")
    stages.translate_split(model, he, tmp_path / "bench" / "pred", 2, "cpu", print)
    assert Image.open(next((tmp_path / "at_model").glob("*.png"))).size == (32, 32)
    assert Image.open(next((tmp_path / "at_input").glob("*.png"))).size == (64, 64)

    res = {k: evaluate(tmp_path / k, gt, workers=1, progress=False, bootstrap=0)
           for k in ("at_model", "at_input", "bench/pred")}
    for k in ("at_input", "bench/pred"):
        for a, b in zip(res["at_model"].rows, res[k].rows, strict=True):
            assert (a["ssim"], a["psnr"], a["dab_od_pred"]) == (b["ssim"], b["psnr"], b["dab_od_pred"]), k
    # what each report records is what was applied, where it was applied
    rz = res["at_model"].metrics["protocol"]["resize"]
    assert (rz["filter"], rz["resized"], rz["pred_sizes"], rz["gt_sizes"]) == ("bicubic", 4, {"32x32": 4}, {"64x64": 4})
    assert rz["translate"]["output_size"] == "model" and rz["translate"]["resize_filter"] is None
    rz = res["at_input"].metrics["protocol"]["resize"]
    assert (rz["resized"], rz["pred_sizes"]) == (0, {"64x64": 4})
    assert rz["translate"]["output_size"] == "input" and rz["translate"]["resize_filter"] == "bicubic"
    assert res["bench/pred"].metrics["protocol"]["resize"]["translate"]["output_size"] == "model"


@pytest.mark.parametrize("name", ["bilinear", "nearest", "lanczos"])
def test_the_recorded_filter_is_the_applied_one(tmp_path: Path, rng: np.random.Generator, name: str) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gts, preds = [], []
    for i in range(3):
        g = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        p = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(g).save(gt_dir / f"{i}.png")
        Image.fromarray(p).save(pred_dir / f"{i}.png")
        gts.append(g)
        preds.append(p)
    res = evaluate(pred_dir, gt_dir, workers=1, progress=False, resize_filter=name, bootstrap=0)
    rz = res.metrics["protocol"]["resize"]
    assert rz["filter"] == name and f"Resampling.{FILTERS[name].name}" in rz["method"]
    for row, g, p in zip(res.rows, gts, preds, strict=True):
        up = np.asarray(Image.fromarray(p).resize((48, 48), FILTERS[name]))
        assert row["ssim"] == pytest.approx(structural_similarity(g, up, channel_axis=-1, data_range=255), abs=1e-12)
    with pytest.raises(EvaluationError, match="resize filter"):
        evaluate(pred_dir, gt_dir, workers=1, progress=False, resize_filter="cubic")


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_of_a_proportion_matches_the_closed_form(rng: np.random.Generator) -> None:
    x = (rng.random(400) < 0.3).astype(float)
    p = x.mean()
    r = bootstrap.bootstrap_ci([x], "mean", bootstrap.resample_indices(400, 20000, 1))
    assert r["estimate"] == p
    assert r["se"] == pytest.approx(math.sqrt(p * (1 - p) / 400), rel=0.03)  # plug-in binomial SE
    half = 1.959964 * math.sqrt(p * (1 - p) / 400)
    assert r["ci_low"] == pytest.approx(p - half, abs=0.006) and r["ci_high"] == pytest.approx(p + half, abs=0.006)


def test_bootstrap_replicates_equal_a_brute_force_loop_over_every_resample(rng: np.random.Generator) -> None:
    n = 4
    a, b = rng.normal(size=n), rng.normal(size=n)
    a[0] = math.inf  # PSNR of a pixel-identical pair: left out of the mean, as in the report
    idx = np.array(list(itertools.product(range(n), repeat=n)))  # all n^n resamples
    reps = bootstrap.replicates([a], "mean", idx)
    for row, got in zip(idx, reps, strict=True):
        fin = [a[i] for i in row if math.isfinite(a[i])]
        assert (math.isnan(got) and not fin) or got == pytest.approx(np.mean(fin))
    reps = bootstrap.replicates([b, b ** 2 + a.clip(-5, 5)], "pearson", idx)
    for row, got in zip(idx, reps, strict=True):
        u, v = b[row], (b ** 2 + a.clip(-5, 5))[row]
        ref = np.corrcoef(u, v)[0, 1] if u.std() > 0 and v.std() > 0 else math.nan
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref)
    lo, hi = bootstrap.interval(np.array([3.0, 1.0, math.nan, 2.0, 4.0]), 0.5)
    assert (lo, hi) == pytest.approx(tuple(np.quantile([1.0, 2.0, 3.0, 4.0], [0.25, 0.75])))


def test_two_level_bootstrap_equals_an_explicit_loop(rng: np.random.Generator) -> None:
    vals = rng.normal(size=(3, 7))
    img = rng.integers(0, 7, size=(50, 7))
    sd = rng.integers(0, 3, size=(50, 3))
    got = bootstrap.two_level([vals], "mean", img, sd)
    ref = [np.mean([vals[s, img[j]].mean() for s in sd[j]]) for j in range(50)]
    np.testing.assert_allclose(got, ref)


def test_paired_difference_is_exact_for_a_constant_shift_and_reports_power(rng: np.random.Generator) -> None:
    ref = rng.random((1, 60))
    d = bootstrap.paired_difference([ref + 0.05], [ref], "mean", b=500)
    assert d["estimate"] == pytest.approx(0.05)
    assert d["ci_low"] == pytest.approx(0.05) and d["ci_high"] == pytest.approx(0.05) and d["excludes_zero"]
    # noise around the same mean: an interval that covers 0, and detectable = 2.80 SE
    other = ref + rng.normal(0, 0.2, ref.shape)
    other -= other.mean() - ref.mean()
    d = bootstrap.paired_difference([other], [ref], "mean", b=2000, seed=3)
    assert d["ci_low"] < 0 < d["ci_high"] and not d["excludes_zero"]
    assert d["detectable"] == pytest.approx(2.801585 * d["se"], rel=1e-6)
    assert d["se"] == pytest.approx((other - ref).std() / math.sqrt(60), rel=0.1)
    assert bootstrap.paired_difference([other], [ref], "mean", b=200, seed=3) == \
        bootstrap.paired_difference([other], [ref], "mean", b=200, seed=3)  # seeded
    with pytest.raises(ValueError, match="same test images"):
        bootstrap.paired_difference([ref[:, :5]], [ref], "mean")


def test_paired_psnr_leaves_out_images_infinite_for_either_model(rng: np.random.Generator) -> None:
    ref, other = rng.normal(20, 2, (1, 30)), rng.normal(21, 2, (1, 30))
    other[0, 3] = math.inf  # pixel-identical for one model only
    d = bootstrap.paired_difference([other], [ref], "mean", b=200)
    keep = np.arange(30) != 3
    assert d["estimate"] == pytest.approx(other[0, keep].mean() - ref[0, keep].mean())


def test_seed_noise_widens_the_interval(rng: np.random.Generator) -> None:
    base = rng.random(200)
    same = np.stack([base] * 3)
    spread = np.stack([base - 0.1, base, base + 0.1])
    a = bootstrap.seed_image_interval([same], "mean", b=2000)
    b = bootstrap.seed_image_interval([spread], "mean", b=2000)
    assert a["estimate"] == pytest.approx(b["estimate"])
    assert b["ci_high"] - b["ci_low"] > 1.5 * (a["ci_high"] - a["ci_low"])


# ---------------------------------------------------------------------------------------------- evaluate


class _MeanEvaluator(torch.nn.Module):
    """Features = per-channel means and stds; logits favour level = brightness quartile."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return -(m[:, None] - torch.linspace(-0.5, 0.5, 4)[None]) ** 2


def test_evaluate_reports_intervals_and_the_self_match_rate(tmp_path: Path, rng: np.random.Generator) -> None:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for i in range(12):
        g = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        name = f"{i:05d}_test_{('0', '1+', '2+', '3+')[i % 4]}.png"
        Image.fromarray(g).save(gt_dir / name)
        # the first half are copies of their own ground truth, the rest unrelated images
        Image.fromarray(g if i < 6 else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(pred_dir / name)
    res = evaluate(pred_dir, gt_dir, classifier=_MeanEvaluator(), device="cpu", workers=1, progress=False,
                   bootstrap=400, seed=5)
    sem, unc = res.metrics["semantic"], res.metrics["uncertainty"]
    own = np.array([r["own_gt_nearest"] for r in res.rows])
    assert own[:6].all() and sem["self_match_rate"] == pytest.approx(own.mean())
    assert any("own ground truth as nearest library entry" in w for w in res.warnings)  # > 25 %: the include top-1 is inflated
    assert unc["b"] == 400 and unc["seed"] == 5 and unc["n_images"] == 12
    for name in ("ssim", "top1", "top1_exclude_self", "knn", "evaluator_accuracy", "self_match_rate", "dab_od_r"):
        c = unc["metrics"][name]
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"], name
    assert unc["metrics"]["top1"]["estimate"] == pytest.approx(sem["top1"])
    assert unc["metrics"]["top1_exclude_self"]["estimate"] == pytest.approx(sem["exclude_self"]["top1"])
    assert unc["metrics"]["ssim"]["estimate"] == pytest.approx(res.metrics["pixel"]["ssim"]["mean"])
    assert unc["metrics"]["psnr"]["estimate"] == pytest.approx(res.metrics["pixel"]["psnr"]["mean"])  # finite values only
    again = evaluate(pred_dir, gt_dir, classifier=_MeanEvaluator(), device="cpu", workers=1, progress=False,
                     bootstrap=400, seed=5)
    assert again.metrics["uncertainty"] == unc  # seeded
    json.dumps(res.metrics)  # JSON-able


# ---------------------------------------------------------------------------------------------- benchmark


def _run(model: str, seed: int, ssim: np.ndarray, top1: np.ndarray) -> dict:
    names = [f"{i}" for i in range(ssim.size)]
    return {"model": model, "seed": seed, "metrics": {"ssim": float(ssim.mean()), "top1": float(top1.mean())},
            "per_image": {"names": names, "ssim": ssim.tolist(), "top1": top1.tolist()}}


def test_benchmark_comparisons_mark_real_differences_only(rng: np.random.Generator) -> None:
    from derestainer.benchmark.stats import comparisons
    from derestainer.benchmark.tables import TABLE1_COLUMNS, differences_table

    n = 200
    base = rng.random(n)
    runs = []
    for s in range(3):
        runs.append(_run("ref", s, base + rng.normal(0, 0.01, n), (rng.random(n) < 0.5).astype(float)))
        runs.append(_run("better", s, base + 0.05 + rng.normal(0, 0.01, n), (rng.random(n) < 0.5).astype(float)))
    runs.append(_run("floor-x", 0, base - 0.2, np.zeros(n)))
    c = comparisons(runs, ["ref", "better", "floor-x"], "ref", b=500, floors=["floor-x"])
    d = c["differences"]
    assert d["better"]["ssim"]["excludes_zero"] and d["better"]["ssim"]["estimate"] == pytest.approx(0.05, abs=0.005)
    assert d["floor-x"]["ssim"]["estimate"] == pytest.approx(-0.2, abs=0.01) and d["floor-x"]["top1"]["excludes_zero"]
    # top-1 of two coin flips: no real difference; detectable ≈ 2.8 · sqrt(2 · 0.25 / n) (+ seed noise)
    assert c["detectable"]["top1"] == pytest.approx(d["better"]["top1"]["detectable"])
    assert 0.8 * 2.8 * math.sqrt(0.5 / n) < c["detectable"]["top1"] < 2.0 * 2.8 * math.sqrt(0.5 / n)
    table = differences_table(c, TABLE1_COLUMNS)
    assert "| better | +0.050" in table and "smallest detectable Δ" in table and " *" in table
    assert c["intervals"]["ref"]["ssim"]["ci_low"] < c["intervals"]["ref"]["ssim"]["ci_high"]
    stale = [dict(r, per_image=None) for r in runs]
    assert "note" in comparisons(stale, ["ref", "better"], "ref", b=50)


def test_translate_warns_when_inputs_look_like_another_scale(tmp_path: Path, rng: np.random.Generator) -> None:
    from click.testing import CliRunner

    from derestainer.cli import main

    he, _ = _bci_pairs(tmp_path / "data", rng, n=2)
    model = _tiny_model(tmp_path / "g.safetensors", size=32)  # inputs are 64 px = 2x the training size
    res = CliRunner().invoke(main, ["translate", str(he), "-m", str(model), "--out", str(tmp_path / "a"),
                                    "--device", "cpu", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert "at least 1.5x the model's training size (32 px at 2 µm/px) and no --mpp was given" in res.stderr
    res = CliRunner().invoke(main, ["translate", str(he), "-m", str(model), "--out", str(tmp_path / "b"), "--mpp", "1.0",
                                    "--device", "cpu", "--precision", "fp32", "--output-size", "model"])
    assert res.exit_code == 0, res.output
    assert "no --mpp" not in res.stderr
    assert Image.open(tmp_path / "b" / "00000_test_0.png").size == (32, 32)
    record = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert record["output"]["output_size"] == "model" and record["output"]["input_mpp"] == 1.0
    assert record["images"][0]["input_size"] == "64x64" and record["images"][0]["output_size"] == "32x32"
