"""SynthBCI: determinism, BCI layout and names, the HER2 signal in the IHC, the H&E cue, the
adjacent-section geometry, the layers against brute force, the CLI, and colour calibration."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

from derestainer.cli import main
from derestainer.core.io import read_image
from derestainer.data import synth_layers as L
from derestainer.data.synth import (
    SynthParams,
    dataset_files,
    generate_dataset,
    pair_level,
    pair_name,
    pair_seed,
    render_pair,
    with_displacement,
)
from derestainer.stain import stain_concentration_np

BCI_NAME = re.compile(r"^\d{5}_(train|test)_(0|1\+|2\+|3\+)\.png$")
LEVEL_OF = {"0": 0, "1+": 1, "2+": 2, "3+": 3}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


def _smooth(m: np.ndarray) -> np.ndarray:
    """Cells move by about a pixel between sections: compare at a slightly coarser scale."""
    return ndi.gaussian_filter(m, 1.0)


def _to_he_frame(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample an H&E-frame map at the IHC pixels' tissue positions (undoes the known displacement)."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float64)
    return ndi.map_coordinates(img, [yy + flow[0], xx + flow[1]], order=1, mode="nearest")


@pytest.fixture(scope="module")
def sample40() -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """40 pairs at 96 px, 10 per level, seeds unrelated to the level."""
    return [render_pair((2024, i), i % 4, 96) for i in range(40)]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_pixels_different_seed_different() -> None:
    a = render_pair(7, 2, 64)
    b = render_pair(7, 2, 64)
    c = render_pair(8, 2, 64)
    assert a[0].dtype == np.uint8 and a[0].shape == (64, 64, 3) and a[1].shape == (64, 64, 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_dataset_bytes_do_not_depend_on_workers_and_differ_by_seed(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "w1", 9, 3, size=40, seed=3, workers=1)
    generate_dataset(tmp_path / "w2", 9, 3, size=40, seed=3, workers=2)
    generate_dataset(tmp_path / "s4", 9, 3, size=40, seed=4, workers=1)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert len(files) == 2 * 12 + 1  # HE + IHC per pair, and synthbci.json
    for rel in files:
        assert (tmp_path / "w1" / rel).read_bytes() == (tmp_path / "w2" / rel).read_bytes(), rel
    seed3 = {p.read_bytes() for p in (tmp_path / "w1" / "HE" / "train").iterdir()}
    seed4 = {p.read_bytes() for p in (tmp_path / "s4" / "HE" / "train").iterdir()}
    assert len(seed3) == len(seed4) == 9 and not seed3 & seed4


# ----------------------------------------------------------------------------- layout, names, labels

def test_bci_layout_names_and_labels(tmp_path: Path) -> None:
    summary = generate_dataset(tmp_path, 10, 5, size=48, seed=11, workers=1)
    for split, n in (("train", 10), ("test", 5)):
        he = sorted(p.name for p in (tmp_path / "HE" / split).iterdir())
        ihc = sorted(p.name for p in (tmp_path / "IHC" / split).iterdir())
        assert he == ihc and len(he) == n
        assert [int(x[:5]) for x in he] == list(range(n))
        for name in he:
            m = BCI_NAME.match(name)
            assert m is not None and m.group(1) == split, name
        # Every block of four consecutive pairs holds each level once: balanced classes.
        levels = [LEVEL_OF[BCI_NAME.match(x).group(2)] for x in he]
        for b in range(0, n - n % 4, 4):
            assert sorted(levels[b:b + 4]) == [0, 1, 2, 3]
        assert sum(summary["counts"][split].values()) == n
    # The label in a name is the level the pair was rendered with.
    for name in ("00003_train_", "00002_test_"):
        path = next((tmp_path / "HE" / ("train" if "train" in name else "test")).glob(name + "*"))
        split, index = path.stem.split("_")[1], int(path.stem[:5])
        level = LEVEL_OF[path.stem.split("_")[2]]
        assert level == pair_level(11, split, index)
        he, ihc, _ = render_pair(pair_seed(11, split, index), level, 48)
        np.testing.assert_array_equal(read_image(path), he)
        np.testing.assert_array_equal(read_image(tmp_path / "IHC" / split / path.name), ihc)
        assert render_pair(pair_seed(11, split, index), (level + 1) % 4, 48)[1].tobytes() != ihc.tobytes()


def test_bci_dataset_reads_synthbci(tmp_path: Path) -> None:
    datasets = pytest.importorskip("derestainer.data.datasets")
    generate_dataset(tmp_path, 8, 4, size=32, seed=0, workers=1)
    ds = datasets.BCIDataset(tmp_path, "train")
    assert len(ds) == 8
    assert sorted(ds.levels) == [0, 0, 1, 1, 2, 2, 3, 3]
    for name, level in zip(ds.names, ds.levels):
        assert level == pair_level(0, "train", int(Path(name).name[:5])), name


def test_pair_names_and_levels_are_stable() -> None:
    assert pair_name("train", 12, 2) == "00012_train_2+.png"
    assert pair_name("test", 0, 0) == "00000_test_0.png"
    # A pair's level and seed depend on (seed, split, index) only, not on the dataset size.
    small = [level for *_, level in dataset_files(8, 0, 5)]
    large = [level for *_, level in dataset_files(20, 0, 5)]
    assert small == large[:8]
    # every block of four indices holds each level once (balanced classes)
    assert all(sorted(large[i:i + 4]) == [0, 1, 2, 3] for i in range(0, 20, 4))
    assert pair_seed(5, "train", 3) != pair_seed(5, "test", 3)


# ----------------------------------------------------------------------------- the HER2 signal

def test_mean_dab_rises_strictly_with_level(sample40) -> None:
    dab = {lvl: [] for lvl in range(4)}
    for _, ihc, info in sample40:
        dab[info["level"]].append(stain_concentration_np(ihc, "dab").mean())
    means = [float(np.mean(dab[lvl])) for lvl in range(4)]
    assert all(len(dab[lvl]) == 10 for lvl in range(4))
    assert means[0] < means[1] < means[2] < means[3], means
    # 3+ is strong: clearly above 0 (not a rounding-level difference).
    assert means[3] > 2 * means[0]


def test_no_eosin_in_ihc_and_dab_trend_only_in_ihc(sample40) -> None:
    def mean(stain: str, which: int, level: int | None = None) -> float:
        return float(np.mean([stain_concentration_np(p[which], stain).mean() for p in sample40
                              if level is None or p[2]["level"] == level]))

    # The IHC has no eosin: its Ruifrok E channel is a small fraction of the H&E's.
    assert mean("e", 1) < 0.3 * mean("e", 0)
    # Ruifrok's DAB channel picks up some cross-talk from H&E, but the level trend is the IHC's.
    assert mean("dab", 1, 3) - mean("dab", 1, 0) > 3 * abs(mean("dab", 0, 3) - mean("dab", 0, 0))


def test_her2_patterns_positive_fraction(sample40) -> None:
    pos = {lvl: [i["positive_fraction"] for _, _, i in sample40 if i["level"] == lvl] for lvl in range(4)}
    assert max(pos[0]) <= 0.2  # 0: none or few cells
    assert np.mean(pos[3]) >= 0.75  # 3+: most cells, complete and strong


# ----------------------------------------------------------------------------- the H&E cue

def test_he_carries_a_partial_morphological_cue(sample40) -> None:
    # Measured on the rendered H&E, not read from the generator's info: the fraction of pixels that
    # are nuclear (Ruifrok haematoxylin above a threshold) grows with the level.
    frac = {lvl: [] for lvl in range(4)}
    for he, _, info in sample40:
        frac[info["level"]].append(float((stain_concentration_np(he, "h") > 0.06).mean()))
    means = [float(np.mean(frac[lvl])) for lvl in range(4)]
    assert means[0] < means[1] < means[2] < means[3], means
    # Partial, not a give-away: adjacent levels overlap.
    assert max(frac[0]) > min(frac[1])
    # Nuclear size grows with level (generator truth), with per-slide jitter.
    radius = [np.mean([i["nucleus_radius"] for _, _, i in sample40 if i["level"] == lvl]) for lvl in range(4)]
    assert radius[0] < radius[1] < radius[2] < radius[3]


# ----------------------------------------------------------------------------- adjacent sections

def test_h_channels_align_far_better_than_e_and_dab() -> None:
    h_aligned, h_raw, e_dab = [], [], []
    for k in range(8):
        he, ihc, info = render_pair((31, k), 2 + k % 2, 96)
        tissue = (stain_concentration_np(he, "h") + stain_concentration_np(he, "e")) > 0.02
        h_he, h_ihc = stain_concentration_np(he, "h"), stain_concentration_np(ihc, "h")
        e_he, dab_ihc = stain_concentration_np(he, "e"), stain_concentration_np(ihc, "dab")
        mask = _to_he_frame(tissue.astype(float), info["flow"]) > 0.5
        h_aligned.append(_corr(_smooth(_to_he_frame(h_he, info["flow"]))[mask], _smooth(h_ihc)[mask]))
        h_raw.append(_corr(_smooth(h_he)[mask], _smooth(h_ihc)[mask]))
        e_dab.append(_corr(_smooth(_to_he_frame(e_he, info["flow"]))[mask], _smooth(dab_ihc)[mask]))
        assert np.abs(info["flow"]).max() > 0.5  # the IHC really is displaced
    assert np.mean(h_aligned) > 0.6, h_aligned
    assert np.mean(h_aligned) > np.mean(e_dab) + 0.35, (h_aligned, e_dab)
    # Undoing the known displacement matters: the flow is right and not negligible.
    assert np.mean(h_aligned) > np.mean(h_raw) + 0.15, (h_aligned, h_raw)


def test_zero_flow_warp_is_the_crop(rng) -> None:
    maps = rng.random((2, 30, 30)).astype(np.float32)
    out = L.warp_maps(maps, np.zeros((2, 20, 20), np.float32), pad=5)
    np.testing.assert_allclose(out, maps[:, 5:25, 5:25], atol=1e-6)


# ----------------------------------------------------------------------------- layers vs references

def test_voronoi_matches_brute_force(rng) -> None:
    pts = rng.uniform(0, 39, (25, 2))
    cell = L.voronoi((40, 40), pts)
    snapped = np.rint(pts)
    yy, xx = np.mgrid[0:40, 0:40]
    d2 = (yy[..., None] - snapped[:, 0]) ** 2 + (xx[..., None] - snapped[:, 1]) ** 2
    best = d2.min(axis=-1)
    # Ties may go either way; the chosen point must be at the minimal distance.
    np.testing.assert_array_equal(d2[yy, xx, cell], best)


def test_smooth_field_moments_and_scale(rng) -> None:
    for kwargs in ({"scale": 3.0}, {"scale": 20.0}, {"scale": 10.0, "stretch": 3.0, "angle": 0.5}):
        f = L.smooth_field(rng, (80, 90), **kwargs)
        assert f.shape == (80, 90) and f.dtype == np.float32
        assert abs(f.mean()) < 1e-4 and abs(f.std() - 1) < 1e-3
    fine = L.smooth_field(rng, (128, 128), 3.0)
    coarse = L.smooth_field(rng, (128, 128), 30.0)
    assert _corr(coarse[:, :-4], coarse[:, 4:]) > 0.9 > _corr(fine[:, :-4], fine[:, 4:])
    # Anisotropy: along x correlation outlasts the one along y.
    streak = L.smooth_field(rng, (128, 128), 6.0, stretch=6.0, angle=0.0)
    assert _corr(streak[:, :-6], streak[:, 6:]) > _corr(streak[:-6], streak[6:]) + 0.3


def test_membrane_arcs_cover_the_asked_fraction() -> None:
    # Square cells on a grid: a complete arc stains every border pixel, a half arc about half.
    cell = (np.arange(60)[:, None] // 15) * 4 + (np.arange(60)[None, :] // 15)
    centres = np.array([[15 * (j // 4) + 7, 15 * (j % 4) + 7] for j in range(16)], dtype=float)
    border = L.cell_borders(cell, np.ones_like(cell, bool))
    full = L.membrane_arcs(cell, border, centres, np.ones(16), np.zeros(16))
    half = L.membrane_arcs(cell, border, centres, np.full(16, 0.5), np.zeros(16))
    none = L.membrane_arcs(cell, border, centres, np.zeros(16), np.zeros(16))
    assert full.sum() == border.sum()
    assert 0.4 < half.sum() / border.sum() < 0.6
    assert none.sum() <= 16  # at most a pixel exactly on each arc centre


@pytest.mark.parametrize("completeness", [0.1, 0.25, 0.5, 0.8])
def test_membrane_arc_fraction_is_the_completeness_on_a_round_cell(completeness: float) -> None:
    # One disk-shaped cell: its border pixels are spread evenly in angle, so the stained fraction
    # must equal the completeness for any arc direction (0, ½ and 1 alone would not tell a
    # cos ≥ 1 − 2c rule, which covers arccos(1 − 2c)/π, from the right one).
    yy, xx = np.mgrid[:121, :121]
    cell = np.where((yy - 60) ** 2 + (xx - 60) ** 2 <= 50**2, 0, -1)
    border = L.cell_borders(cell, np.ones(cell.shape, bool)) & (cell >= 0)
    for angle in np.linspace(0.0, 2 * np.pi, 5)[:-1]:
        arc = L.membrane_arcs(cell, border, np.array([[60.0, 60.0]]), np.array([completeness]), np.array([angle]))
        assert abs(arc.sum() / border.sum() - completeness) < 0.03, angle


def test_beer_lambert_matches_the_closed_form() -> None:
    m = SynthParams().he_h_vector
    rgb_from = np.array([m, [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    conc = np.zeros((2, 2, 3))
    conc[..., 0] = 0.7
    out = L.beer_lambert(conc, rgb_from, np.array([0.9, 0.9, 0.9]))
    np.testing.assert_allclose(out[0, 0], 0.9 * np.exp(-0.7 * np.asarray(m)), rtol=1e-9)


def test_render_pair_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="level"):
        render_pair(0, 4, 64)
    with pytest.raises(ValueError, match="size"):
        render_pair(0, 1, 8)


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_dataset_and_guards_stale_files(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ds"
    r = runner.invoke(main, ["synth", "--out", str(out), "--train", "5", "--test", "3", "--size", "32",
                             "--seed", "2", "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert "wrote 8 pairs" in r.output
    assert len(list((out / "IHC" / "train").glob("*.png"))) == 5
    assert (out / "synthbci.json").is_file()
    # Same command again: same files, allowed.
    r = runner.invoke(main, ["synth", "--out", str(out), "--train", "5", "--test", "3", "--size", "32",
                             "--seed", "2", "--workers", "1"])
    assert r.exit_code == 0, r.output
    # Fewer pairs would leave stale files: refused without --overwrite, no traceback.
    r = runner.invoke(main, ["synth", "--out", str(out), "--train", "2", "--test", "0", "--size", "32", "--seed", "2"])
    assert r.exit_code != 0 and "--overwrite" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["synth", "--out", str(out), "--train", "2", "--test", "0", "--size", "32",
                             "--seed", "2", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert len(list((out / "HE" / "train").glob("*.png"))) == 2
    assert not list((out / "HE" / "test").glob("*.png"))
    r = runner.invoke(main, ["synth", "--out", str(out), "--train", "0", "--test", "0"])
    assert r.exit_code != 0 and "nothing to generate" in r.output


def test_registered_pairs_show_the_same_tissue_displaced_less() -> None:
    reg = with_displacement(SynthParams(), "registered")
    mean_flow = {"adjacent": [], "registered": []}
    for seed in range(4):
        he_a, ihc_a, info_a = render_pair(seed, 3, 64)
        he_r, ihc_r, info_r = render_pair(seed, 3, 64, params=reg)
        assert np.array_equal(he_a, he_r)  # same tissue and stains from the same seed: only the IHC moves
        assert not np.array_equal(ihc_a, ihc_r)
        assert np.abs(info_r["shift"]).max() <= 1.0 and abs(info_r["rotation_deg"]) <= 0.5
        assert np.abs(info_a["shift"]).max() <= 6.0 and abs(info_a["rotation_deg"]) <= 2.0
        # shift ≤ 1 px per axis + rotation ≤ 0.5° at the corners + a warp of 0.5 px σ (4σ bound)
        assert np.hypot(*info_r["flow"]).max() <= np.sqrt(2) + np.sin(np.radians(0.5)) * 64 + 4 * 0.5
        mean_flow["adjacent"].append(np.hypot(*info_a["flow"]).mean())
        mean_flow["registered"].append(np.hypot(*info_r["flow"]).mean())
    assert np.mean(mean_flow["registered"]) < 0.5 * np.mean(mean_flow["adjacent"])
    with pytest.raises(ValueError, match="unknown displacement"):
        with_displacement(SynthParams(), "folded")


def test_cli_displacement_is_recorded(tmp_path: Path) -> None:
    runner = CliRunner()
    for name in ("adjacent", "registered"):
        out = tmp_path / name
        r = runner.invoke(main, ["synth", "--out", str(out), "--train", "4", "--test", "0", "--size", "32",
                                 "--workers", "1", "--displacement", name])
        assert r.exit_code == 0, r.output
        made = json.loads((out / "synthbci.json").read_text())
        assert made["displacement"] == name and made["params"]["max_shift"] == (6.0 if name == "adjacent" else 1.0)
    he = [read_image(tmp_path / n / "HE" / "train" / "00001_train_0.png") for n in ("adjacent", "registered")]
    assert np.array_equal(*he)


# ----------------------------------------------------------------------------- calibration

def test_colours_near_real_images(real_data: Path) -> None:
    from derestainer.core.io import list_images
    from derestainer.data import synth_calibration as C

    real_he = C.summarise(read_image(p) for p in list_images(real_data / "he"))
    real_ihc = [read_image(real_data / "ihc" / "skimage_ihc.png")]
    pairs = [render_pair((77, i), i % 4, 128) for i in range(16)]
    he = C.summarise(p[0] for p in pairs)
    # Within the spread of the real tiles around their own median (ΔE00 7–25 here), and close.
    assert C.delta_e(he["lab"], real_he["lab"]) < 5.0
    ihc3 = [render_pair((78, i), 3, 128)[1] for i in range(8)]
    assert C.delta_e(C.summarise(ihc3, "dab+")["lab"], C.summarise(real_ihc, "dab+")["lab"]) < 6.0
    assert C.delta_e(C.summarise((p[1] for p in pairs), "dab-")["lab"], C.summarise(real_ihc, "dab-")["lab"]) < 6.0


def test_generator_does_not_import_torch() -> None:
    """SynthBCI runs in worker processes: it must not pay torch's import time."""
    import subprocess
    import sys

    code = "import sys, derestainer.data.synth; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
