"""Floor rows (derestainer.evaluation.floors, `derestainer floor`): closed forms and brute force on tiny images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from derestainer.cli import main
from derestainer.core.errors import EvaluationError, OutputError
from derestainer.core.io import read_image, write_image
from derestainer.evaluation.floors import (
    FLOOR_KINDS,
    FLOOR_RECORD,
    hematoxylin_image,
    hematoxylin_scale,
    median_colour,
    write_floor,
)
from derestainer.stain.matrices import stain_index
from derestainer.stain.numpy_ops import hed_to_rgb_np, rgb_to_hed_np

LEVELS = ("0", "1+", "2+", "3+")


def _he_from_concentrations(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 H&E rendered from known H and E concentrations (no DAB), and those concentrations."""
    hed = np.zeros((h, w, 3))
    hed[..., stain_index("h")] = rng.uniform(0.0, 0.08, (h, w))
    hed[..., stain_index("e")] = rng.uniform(0.0, 0.05, (h, w))
    return np.round(hed_to_rgb_np(hed) * 255).astype(np.uint8), hed


def _bci(root: Path, rng: np.random.Generator, n_train: int = 3, n_test: int = 4, size: int = 32) -> None:
    """A tiny BCI-layout folder: H&E from known concentrations, random IHC, odd sizes in the test split."""
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            h, w = (size, size) if split == "train" else (size + i, size + 2 * i + 1)
            name = f"{k:05d}_{split}_{LEVELS[k % 4]}.png"
            write_image(root / "HE" / split / name, _he_from_concentrations(rng, h, w)[0])
            write_image(root / "IHC" / split / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            k += 1


def test_floor_kinds() -> None:
    assert FLOOR_KINDS == ("median", "hematoxylin")


@pytest.mark.parametrize("shapes", [[(3, 5), (2, 1)], [(4, 4), (2, 3)], [(1, 1)], [(2, 1)], [(3, 3), (5, 7)]])
def test_median_colour_is_the_lower_median_of_all_pixels(tmp_path: Path, rng: np.random.Generator,
                                                         shapes: list[tuple[int, int]]) -> None:
    """Odd (17, 1) and even (22, 2, 44) pixel counts: the lower median, sorted(v)[(N - 1) // 2] — for an odd N
    the ordinary median, for an even N the smaller of the two middle values."""
    ims = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    for i, im in enumerate(ims):
        write_image(tmp_path / f"{i}.png", im)
    pixels = np.concatenate([im.reshape(-1, 3) for im in ims])
    n = len(pixels)
    expected = np.sort(pixels, axis=0)[(n - 1) // 2]
    got = median_colour(tmp_path)
    assert got.dtype == np.uint8 and got.shape == (3,)
    np.testing.assert_array_equal(got, expected)
    if n % 2:  # an odd count: numpy's median is a pixel value, and ours is it
        np.testing.assert_array_equal(got, np.median(pixels, axis=0).astype(np.uint8))


def test_median_colour_odd_count_and_even_convention(tmp_path: Path) -> None:
    """Hand-made: 3 pixels (odd) → the middle one; 4 pixels (even) → the lower middle one, not the mean."""
    write_image(tmp_path / "odd" / "a.png", np.array([[[10, 0, 255], [30, 1, 254], [20, 2, 0]]], dtype=np.uint8))
    np.testing.assert_array_equal(median_colour(tmp_path / "odd"), [20, 1, 254])
    write_image(tmp_path / "even" / "a.png", np.array([[[10, 0, 9], [40, 0, 9]]], dtype=np.uint8))
    write_image(tmp_path / "even" / "b.png", np.array([[[20, 100, 9], [30, 101, 200]]], dtype=np.uint8))
    np.testing.assert_array_equal(median_colour(tmp_path / "even"), [20, 0, 9])  # np.median: 25, 50, 9


def test_hematoxylin_image_is_the_h_only_recomposition(rng: np.random.Generator) -> None:
    he, hed = _he_from_concentrations(rng, 9, 11)
    got = hematoxylin_image(he)
    # by hand with the stain NumPy functions: deconvolve the uint8 H&E, keep H, recompose
    c = rgb_to_hed_np(he)
    c[..., stain_index("e")] = 0.0
    c[..., stain_index("dab")] = 0.0
    np.testing.assert_array_equal(got, np.round(hed_to_rgb_np(c) * 255).astype(np.uint8))
    # and that is (to the rounding of the uint8 H&E) the image of the known H concentration alone
    truth = hed.copy()
    truth[..., stain_index("e")] = 0.0
    assert np.abs(got.astype(int) - np.round(hed_to_rgb_np(truth) * 255).astype(int)).max() <= 2
    # no eosin, no DAB left: the floor's own deconvolution finds (almost) only haematoxylin
    back = rgb_to_hed_np(got)
    assert back[..., stain_index("dab")].max() < 0.01 and back[..., stain_index("e")].max() < 0.01
    # a scale multiplies the H concentration
    half = rgb_to_hed_np(hematoxylin_image(he, 0.5))[..., stain_index("h")]
    np.testing.assert_allclose(half, 0.5 * c[..., stain_index("h")], atol=0.01)


def test_hematoxylin_scale_is_the_ratio_of_mean_h(tmp_path: Path, rng: np.random.Generator) -> None:
    he, _ = _he_from_concentrations(rng, 8, 8)
    write_image(tmp_path / "he" / "a.png", he)
    write_image(tmp_path / "ihc" / "a.png", hematoxylin_image(he, 0.5))
    mean_h = rgb_to_hed_np(he)[..., stain_index("h")].mean()
    ihc_h = rgb_to_hed_np(read_image(tmp_path / "ihc" / "a.png"))[..., stain_index("h")].mean()
    assert hematoxylin_scale(tmp_path / "he", tmp_path / "ihc") == pytest.approx(ihc_h / mean_h)
    assert hematoxylin_scale(tmp_path / "he", tmp_path / "ihc") == pytest.approx(0.5, abs=0.05)


def test_write_floor_names_sizes_and_record(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path / "bci", rng)
    he_dir, ihc_train = tmp_path / "bci" / "HE" / "test", tmp_path / "bci" / "IHC" / "train"
    colour = median_colour(ihc_train)
    for kind in FLOOR_KINDS:
        out = tmp_path / kind
        rec = write_floor(kind, he_dir, out, ihc_train)
        assert rec["kind"] == kind and rec["n_images"] == 4 and rec["he_dir"] == str(he_dir)
        assert rec["ihc_train_dir"] == str(ihc_train)
        assert json.loads((out / FLOOR_RECORD).read_text()) == rec
        assert not list(out.glob(".*unfinished"))
        assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in he_dir.glob("*.png"))
        for src in sorted(he_dir.glob("*.png")):
            pred, he = read_image(out / src.name), read_image(src)
            assert pred.shape == he.shape
            if kind == "median":
                assert (pred == colour).all()
            else:
                np.testing.assert_array_equal(pred, hematoxylin_image(he))
    assert write_floor("median", he_dir, tmp_path / "median", ihc_train)["colour"] == [int(c) for c in colour]
    assert write_floor("hematoxylin", he_dir, tmp_path / "hematoxylin", ihc_train)["h_scale"] == 1.0


def test_write_floor_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    _bci(tmp_path / "bci", rng)
    he_dir, ihc_train = tmp_path / "bci" / "HE" / "test", tmp_path / "bci" / "IHC" / "train"
    with pytest.raises(EvaluationError, match="unknown floor"):
        write_floor("mean", he_dir, tmp_path / "o", ihc_train)
    with pytest.raises(EvaluationError, match="training IHC"):
        write_floor("median", he_dir, tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no H&E images"):
        write_floor("hematoxylin", tmp_path / "empty", tmp_path / "o")
    before = {p.name: p.read_bytes() for p in he_dir.iterdir()}
    for out in (he_dir, he_dir / "floor", tmp_path / "bci"):  # is, lies inside, holds an input
        with pytest.raises(OutputError, match="outside the inputs"):
            write_floor("hematoxylin", he_dir, out, ihc_train)
    assert {p.name: p.read_bytes() for p in he_dir.iterdir()} == before  # nothing overwritten or added


def test_cli_floor_end_to_end_then_evaluate(tmp_path: Path, rng: np.random.Generator) -> None:
    root = tmp_path / "bci"
    _bci(root, rng)
    runner = CliRunner()
    outs = {}
    for kind in FLOOR_KINDS:
        outs[kind] = tmp_path / f"floor_{kind}"
        res = runner.invoke(main, ["floor", "--kind", kind, "--data", str(root), "--out", str(outs[kind])])
        assert res.exit_code == 0, res.output
        assert f"wrote the {kind} floor of 4 image(s)" in res.output
    rec = json.loads((outs["hematoxylin"] / FLOOR_RECORD).read_text())
    assert rec["h_scale"] == pytest.approx(hematoxylin_scale(root / "HE" / "train", root / "IHC" / "train"))
    assert json.loads((outs["median"] / FLOOR_RECORD).read_text())["colour"] == median_colour(root / "IHC" / "train").tolist()
    # explicit folders give the same images as --data (without --he-train: no scale)
    res = runner.invoke(main, ["floor", "--kind", "median", "--he", str(root / "HE" / "test"),
                               "--ihc-train", str(root / "IHC" / "train"), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 0, res.output
    for p in outs["median"].glob("*.png"):
        np.testing.assert_array_equal(read_image(p), read_image(tmp_path / "m2" / p.name))
    # the floor is scored like any prediction
    res = runner.invoke(main, ["evaluate", "--pred", str(outs["hematoxylin"]), "--gt", str(root / "IHC" / "test"),
                               "--out", str(tmp_path / "eval"), "--workers", "1", "--bootstrap", "10", "--no-figures",
                               "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "ssim" in json.dumps(metrics).lower() and "psnr" in json.dumps(metrics).lower()


def test_cli_floor_bad_input_is_one_line(tmp_path: Path, rng: np.random.Generator) -> None:
    root = tmp_path / "bci"
    _bci(root, rng)
    runner = CliRunner()
    he = root / "HE" / "test"
    cases = [
        (["--kind", "median", "--he", str(he), "--out", str(tmp_path / "o")], "needs the training IHC"),
        (["--kind", "median", "--out", str(tmp_path / "o")], "--he"),
        (["--kind", "hematoxylin", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not a folder"),
        (["--kind", "hematoxylin", "--he", str(he), "--out", str(he / "sub")], "outside the inputs"),
    ]
    for args, message in cases:
        res = runner.invoke(main, ["floor", *args])
        assert res.exit_code != 0 and message in res.output, res.output
        assert "Traceback" not in res.output and res.output.strip().count("\n") == 0
    (he / "00004_test_0.png").write_bytes(b"not a png")
    res = runner.invoke(main, ["floor", "--kind", "hematoxylin", "--he", str(he), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "00004_test_0.png" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))  # checked before writing
