"""Metric functions against references: scikit-image, closed forms, brute force, hand-built feature sets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter, zoom
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from derestainer.core.io import read_image
from derestainer.core.levels import confusion_matrix
from derestainer.metrics import fid as F
from derestainer.metrics import pixel, semantic, stain
from derestainer.stain import hed_to_rgb_np


def blobs(rng: np.random.Generator, size: int = 64, cells: int = 8) -> np.ndarray:
    """A structured uint8 RGB image: upsampled noise blobs (not white noise, so SSIM has structure)."""
    low = rng.random((cells, cells, 3))
    up = zoom(low, (size / cells, size / cells, 1), order=3)
    return (np.clip(up, 0, 1) * 255).round().astype(np.uint8)


def ihc_like(rng: np.random.Generator, dab: float, size: int = 48) -> np.ndarray:
    """IHC-like uint8 image: random haematoxylin blobs, DAB ``dab`` (HED units) on membrane-like rings.

    The DAB pattern is the same in every image, so the image's DAB amount is set by ``dab`` alone.
    """
    h = np.clip(gaussian_filter(rng.random((size, size)), 2) * 4 - 1.5, 0, None) * 0.05
    yy, xx = np.mgrid[:size, :size] % 16 - 7.5
    mask = np.clip(1.5 - np.abs(np.hypot(yy, xx) - 5.0), 0, 1)  # rings of radius 5 px, one per 16 px cell
    hed = np.stack([h, np.zeros_like(h), dab * mask], axis=-1)
    return (hed_to_rgb_np(hed) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- pixel


def test_ssim_psnr_equal_scikit_image_on_known_pairs(rng):
    for _ in range(3):
        gt = blobs(rng)
        noisy = np.clip(gt.astype(int) + rng.integers(-30, 31, gt.shape), 0, 255).astype(np.uint8)
        assert pixel.ssim(gt, noisy) == pytest.approx(structural_similarity(gt, noisy, channel_axis=-1, data_range=255), abs=1e-12)
        assert pixel.psnr(gt, noisy) == pytest.approx(peak_signal_noise_ratio(gt, noisy, data_range=255), abs=1e-12)
        assert 0.0 < pixel.ssim(gt, noisy) < 1.0


def test_psnr_closed_form_constant_offset(rng):
    gt = (rng.integers(20, 200, (32, 40, 3))).astype(np.uint8)
    pred = gt + np.uint8(5)  # MSE = 25 exactly
    assert pixel.psnr(gt, pred) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)


def test_identical_images_give_ssim_one_and_psnr_inf(rng):
    gt = blobs(rng)
    assert pixel.ssim(gt, gt.copy()) == pytest.approx(1.0, abs=1e-12)
    assert pixel.psnr(gt, gt.copy()) == math.inf
    s = pixel.summarize([20.0, 30.0, math.inf])
    assert s["mean"] == pytest.approx(25.0) and s["n_inf"] == 1 and s["n_finite"] == 2 and s["max"] == 30.0
    assert pixel.summarize([math.inf])["mean"] is None


def test_prediction_is_resized_bicubically_to_ground_truth_size(rng):
    gt = blobs(rng, 64)
    pred_small = blobs(rng, 32)
    up = np.asarray(Image.fromarray(pred_small).resize((64, 64), Image.BICUBIC))
    m = pixel.pixel_metrics(gt, pred_small)
    assert m["ssim"] == pytest.approx(structural_similarity(gt, up, channel_axis=-1, data_range=255), abs=1e-12)
    assert m["psnr"] == pytest.approx(peak_signal_noise_ratio(gt, up, data_range=255), abs=1e-12)
    with pytest.raises(ValueError, match="aspect ratio"):
        pixel.resize_to(blobs(rng, 32)[:, :16], (64, 64))
    with pytest.raises(ValueError, match="uint8"):
        pixel.ssim(gt.astype(np.float32), gt.astype(np.float32))


def test_ssim_on_real_ihc_against_blurred_copy(real_data):
    ihc = read_image(real_data / "ihc" / "skimage_ihc.png")
    blurred = np.clip(gaussian_filter(ihc.astype(float), (1.5, 1.5, 0)), 0, 255).round().astype(np.uint8)
    ref = structural_similarity(ihc, blurred, channel_axis=-1, data_range=255)
    assert pixel.ssim(ihc, blurred) == pytest.approx(ref, abs=1e-6)
    assert pixel.psnr(ihc, blurred) == pytest.approx(peak_signal_noise_ratio(ihc, blurred, data_range=255), abs=1e-6)
    assert 0.3 < ref < 0.99


# ---------------------------------------------------------------------------------------------- semantic


def brute_force(q, lib, lib_y, q_y, k_list, knn_k, exclude_self):
    """Loops, no vectorisation: neighbours by (−cos, index), top-k hits, kNN by counts then summed similarity."""
    out = {f"top{k}": [] for k in k_list}
    out["knn"] = []
    for i in range(len(q)):
        sims = []
        for j in range(len(lib)):
            if exclude_self and j == i:
                continue
            c = float(np.dot(q[i], lib[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(lib[j])))
            sims.append((-c, j))
        sims.sort()
        for k in k_list:
            out[f"top{k}"].append(q_y[i] in [lib_y[j] for _, j in sims[:k]])
        votes: dict[int, list[float]] = {}
        for negc, j in sims[:knn_k]:
            votes.setdefault(int(lib_y[j]), []).append(-negc)
        best = max(votes.items(), key=lambda kv: (len(kv[1]), sum(kv[1])))[0]
        out["knn"].append(best == q_y[i])
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("self_match", ["include", "exclude"])
def test_semantic_metrics_equal_brute_force(rng, self_match):
    n, d = 40, 16
    lib = rng.normal(size=(n, d))
    lib_y = rng.integers(0, 4, n)
    q = lib + rng.normal(scale=1.2, size=(n, d))  # generated ≈ own ground truth + noise
    got = semantic.semantic_metrics(q, lib, lib_y, lib_y, self_index=np.arange(n), self_match=self_match)
    ref = brute_force(q, lib, lib_y, lib_y, (1, 3, 5), 10, self_match == "exclude")
    for k in ("top1", "top3", "top5", "knn"):
        assert got[k] == pytest.approx(ref[k]), k
    assert got["knn_k"] == 10 and got["n"] == n
    assert got["top1"] <= got["top3"] <= got["top5"]


def test_topk_on_hand_built_features():
    # Library: the 8 unit axes, levels 0,0,1,1,2,2,3,3. The query points mostly along axis 0 (level 0),
    # then axis 2 (level 1), then axis 4 (level 2): neighbours in that order, all others at similarity 0.
    lib = np.eye(8)
    lib_y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    q = np.array([[1.0, 0, 0.5, 0, 0.25, 0, 0, 0]])
    for true, expect in [(0, (1, 1, 1)), (1, (0, 1, 1)), (2, (0, 0, 1)), (3, (0, 0, 0))]:
        m = semantic.semantic_metrics(q, lib, lib_y, [true], ks=(1, 2, 3), knn_k=1)
        assert (m["top1"], m["top2"], m["top3"]) == expect, true
    # k=5: axes 0, 2, 4, then the zero-similarity axes in library order (1, 3): levels 0,1,2,0,1
    idx, sims = semantic.nearest_neighbours(semantic.cosine_similarity(q, lib), 5)
    assert idx.tolist() == [[0, 2, 4, 1, 3]]
    assert sims[0, :3] == pytest.approx(np.array([1, 0.5, 0.25]) / np.linalg.norm(q))


def test_self_inclusion_option():
    # Generated image = exact copy of its ground truth; the other library entries of its level lie far away.
    lib = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.05]])
    lib_y = np.array([0, 1, 1, 2])
    q = lib.copy()
    inc = semantic.semantic_metrics(q, lib, lib_y, lib_y, self_index=np.arange(4), self_match="include", ks=(1,), knn_k=1)
    exc = semantic.semantic_metrics(q, lib, lib_y, lib_y, self_index=np.arange(4), self_match="exclude", ks=(1,), knn_k=1)
    assert inc["top1"] == 1.0
    # Excluded: image 0 → nearest other is 3 (level 2, miss); 1 ↔ 2 (hit, hit); 3 → 0 (level 0, miss).
    assert exc["top1"] == 0.5
    assert exc["neighbours"][:, 0].tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="self_index"):
        semantic.semantic_metrics(q, lib, lib_y, lib_y, self_match="exclude")


def test_knn_tie_rules():
    # Four neighbours, levels A B B A with similarities 0.9 0.8 0.79 0.1: two votes each.
    labels = np.array([[0, 1, 1, 0]])
    sims = np.array([[0.9, 0.8, 0.79, 0.1]])
    assert semantic.knn_vote(labels, sims, tie="similarity").tolist() == [1]  # 1.59 > 1.0
    assert semantic.knn_vote(labels, sims, tie="nearest").tolist() == [0]  # level 0 holds the nearest
    # Exactly equal sums fall back to the nearest: 0.5+0.5 vs 0.5+0.5.
    assert semantic.knn_vote(np.array([[2, 3, 3, 2]]), np.full((1, 4), 0.5)).tolist() == [2]
    # A clear majority wins whatever the similarities.
    assert semantic.knn_vote(np.array([[0, 3, 3]]), np.array([[0.99, 0.1, 0.1]]), tie="similarity").tolist() == [3]
    with pytest.raises(ValueError, match="tie"):
        semantic.knn_vote(labels, sims, tie="random")


def test_knn_clipped_to_library_size_and_confusion_matrix(rng):
    lib = rng.normal(size=(5, 4))
    y = np.array([0, 1, 2, 3, 0])
    m = semantic.semantic_metrics(lib, lib, y, y, self_index=np.arange(5), self_match="exclude")
    assert m["knn_k"] == 4 and m["topk_k"]["top5"] == 4
    t = rng.integers(0, 4, 50)
    p = rng.integers(0, 4, 50)
    cm = confusion_matrix(t, p)
    for i, j in itertools.product(range(4), range(4)):
        assert cm[i, j] == np.sum((t == i) & (p == j))
    assert confusion_matrix([0, -1], [1, 2]).sum() == 1  # unknown levels skipped


def test_l2_normalisation_makes_scale_irrelevant(rng):
    lib = rng.normal(size=(12, 6))
    y = rng.integers(0, 4, 12)
    q = rng.normal(size=(7, 6))
    qy = rng.integers(0, 4, 7)
    a = semantic.semantic_metrics(q, lib, y, qy)
    b = semantic.semantic_metrics(q * rng.uniform(0.1, 10, (7, 1)), lib * 1e3, y, qy)
    assert {k: a[k] for k in ("top1", "top3", "top5", "knn")} == {k: b[k] for k in ("top1", "top3", "top5", "knn")}
    assert np.allclose(np.linalg.norm(semantic.l2_normalize(q), axis=1), 1.0)


# ---------------------------------------------------------------------------------------------- stain


def test_stain_od_recovers_known_dab_amount():
    assert pytest.approx(6.0) == stain.OD_SCALE
    hed = np.zeros((8, 8, 3))
    hed[..., 2] = 0.5 / 6.0  # DAB OD10 of 0.5
    hed[:4, :, 0] = 0.2 / 6.0  # H OD10 of 0.2 on the top half
    s = stain.stain_stats(hed_to_rgb_np(hed))
    assert s["dab_od"] == pytest.approx(0.5, abs=1e-9)
    assert s["h_od"] == pytest.approx(0.1, abs=1e-9)
    assert s["dab_fraction"] == 1.0 and s["h_fraction"] == 0.5


def test_dab_agreement_self_is_perfect_and_shuffled_is_not(rng):
    amounts = np.linspace(0.0, 0.25, 12)
    images = [ihc_like(rng, a) for a in amounts]
    levels = np.repeat([0, 1, 2, 3], 3)
    dab = np.array([stain.stain_stats(im)["dab_od"] for im in images])
    assert np.all(np.diff(dab) > 0)  # the images carry the DAB we put in, in order
    self_agree = stain.agreement(dab, dab, levels)
    assert self_agree["pearson_r"] == pytest.approx(1.0) and self_agree["mae"] == 0.0
    rs = [stain.pearson_r(dab[rng.permutation(12)], dab) for _ in range(200)]
    assert np.mean(rs) < 0.3
    per = self_agree["per_level"]
    assert per["0"]["n"] == 3 and per["3+"]["real"] == pytest.approx(dab[9:].mean())


def test_dab_agreement_on_synthbci(rng):
    synth = pytest.importorskip("derestainer.data.synth", reason="SynthBCI (data/synth.py) not available")
    levels = np.array([0, 1, 2, 3] * 3)
    ihc = [synth.render_pair((7, 1, i), int(lv), size=64)[1] for i, lv in enumerate(levels)]
    stats = [stain.stain_stats(im) for im in ihc]
    for key in ("dab_od", "dab_fraction", "h_od"):
        v = np.array([s[key] for s in stats])
        assert stain.agreement(v, v, levels)["pearson_r"] == pytest.approx(1.0)
        assert np.mean([stain.pearson_r(v[rng.permutation(12)], v) for _ in range(200)]) < 0.3
    frac = np.array([s["dab_fraction"] for s in stats])
    assert frac[levels == 3].mean() > frac[levels == 0].mean()  # 3+ membranes are DAB-positive, 0 are not


def test_pearson_r_matches_numpy_and_is_nan_when_undefined(rng):
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert stain.pearson_r(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert math.isnan(stain.pearson_r(np.ones(5), b[:5]))
    assert math.isnan(stain.pearson_r([1.0], [2.0]))


# ---------------------------------------------------------------------------------------------- FID / KID


def test_frechet_distance_closed_form_for_commuting_covariances(rng):
    d = 5
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # random rotation: both covariances share eigenvectors
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect, rel=1e-9)
    assert F.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_identical_sets_is_zero_and_of_gaussians_near_closed_form(rng):
    x = rng.normal(size=(200, 8))
    assert abs(F.fid(x, x.copy())) < 1e-6
    # Samples of N(0, I) and N(m, diag(4)): closed form |m|² + d·(2 − 1)²
    d, n = 4, 20000
    m = np.array([1.0, -0.5, 0.0, 2.0])
    a = rng.normal(size=(n, d))
    b = m + 2.0 * rng.normal(size=(n, d))
    expect = float(m @ m) + d * 1.0
    assert F.fid(a, b) == pytest.approx(expect, rel=0.05)


def test_fid_survives_singular_covariances(rng):
    x = rng.normal(size=(10, 32))  # fewer samples than dimensions: rank-deficient covariances
    y = rng.normal(size=(10, 32)) + 0.5
    v = F.fid(x, y)
    assert np.isfinite(v) and v > 0


def test_fid_of_one_repeated_image_is_the_closed_form_without_warnings(rng):
    """A floor row (one colour everywhere) has features with zero covariance: Σ₁Σ₂ = 0 is singular,
    (Σ₁Σ₂)^½ = 0 and FID = ‖μ₁ − μ₂‖² + Tr Σ₂, silently."""
    import warnings

    x = np.tile(rng.normal(size=(1, 16)), (8, 1))
    y = rng.normal(size=(8, 16))
    mu2, s2 = F.feature_statistics(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = F.fid(x, y)
    assert v == pytest.approx(float((x[0] - mu2) @ (x[0] - mu2)) + float(np.trace(s2)), rel=1e-9)


def test_kid_equals_brute_force_unbiased_mmd(rng):
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 3)) + 0.3

    def k(u, v):
        return (u @ v / 3 + 1.0) ** 3

    m = 9
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    # A subset of the whole set is a permutation of it and MMD² is permutation-invariant, so with
    # both sets no larger than the subset size KID is computed once, with no (fake zero) spread.
    got = F.kid(x, y, n_subsets=100, subset_size=100)
    assert got["subset_size"] == 9
    assert got["n_subsets"] == 1 and got["n_subsets_requested"] == 100
    assert got["std"] is None
    assert got["mean"] == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_draws_distinct_subsets_when_sets_exceed_subset_size(rng):
    a, b = rng.normal(size=(40, 4)), rng.normal(size=(40, 4)) + 0.2
    got = F.kid(a, b, n_subsets=10, subset_size=15)
    assert got["subset_size"] == 15 and got["n_subsets"] == 10
    # Distinct subsets give distinct MMD² values, hence a real, positive spread.
    assert got["std"] is not None and got["std"] > 0
    # Only one set larger than the subset size still varies across subsets.
    part = F.kid(a[:15], b, n_subsets=10, subset_size=15)
    assert part["n_subsets"] == 10 and part["std"] > 0


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted(rng):
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6))
    same = F.kid(a, b, n_subsets=20, subset_size=100)
    shifted = F.kid(a, b + 1.0, n_subsets=20, subset_size=100)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3
    assert shifted["mean"] > 10 * max(abs(same["mean"]), same["std"])
    with pytest.raises(ValueError, match="at least 2"):
        F.kid(a[:1], b)
