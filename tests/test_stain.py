"""Stain separation against scikit-image, gradients at the edges of the colour cube, stain matrices."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color as skc
import skimage.data
import torch

from derestainer import stain as S
from derestainer.core.io import read_image


def _t(img_u8: np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.from_numpy(img_u8).permute(2, 0, 1)[None].to(dtype) / 255.0


def _np(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).detach().numpy()


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    return skimage.data.immunohistochemistry()


def test_rgb_to_hed_matches_skimage_on_real_ihc(ihc: np.ndarray) -> None:
    ours = _np(S.rgb_to_hed(_t(ihc)))
    assert np.abs(ours - skc.rgb2hed(ihc)).max() <= 1e-6


def test_hed_to_rgb_matches_skimage(ihc: np.ndarray, rng: np.random.Generator) -> None:
    hed = skc.rgb2hed(ihc)
    ours = _np(S.hed_to_rgb(torch.from_numpy(hed).permute(2, 0, 1)[None]))
    assert np.abs(ours - skc.hed2rgb(hed)).max() <= 1e-6
    # and on arbitrary (also negative and large) concentrations
    rnd = rng.normal(0, 0.5, size=(17, 23, 3))
    ours = _np(S.hed_to_rgb(torch.from_numpy(rnd).permute(2, 0, 1)[None]))
    assert np.abs(ours - skc.hed2rgb(rnd)).max() <= 1e-6


def test_matches_skimage_on_random_images(rng: np.random.Generator) -> None:
    for shape in [(32, 48, 3), (5, 7, 3)]:
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        assert np.abs(_np(S.rgb_to_hed(_t(img))) - skc.rgb2hed(img)).max() <= 1e-6
        flt = rng.random(shape)
        x = torch.from_numpy(flt).permute(2, 0, 1)[None]
        assert np.abs(_np(S.rgb_to_hed(x)) - skc.rgb2hed(flt)).max() <= 1e-6
        assert np.abs(S.rgb_to_hed_np(img) - skc.rgb2hed(img)).max() <= 1e-6


def test_channel_image_is_paper_eq2_and_matches_skimage_composition(ihc: np.ndarray) -> None:
    hed = skc.rgb2hed(ihc)
    for k, name in enumerate(["h", "e", "dab"]):
        keep = np.zeros_like(hed)
        keep[..., k] = hed[..., k]
        ref = skc.hed2rgb(keep)
        assert np.abs(_np(S.stain_channel(_t(ihc), name)) - ref).max() <= 1e-6
        assert np.abs(S.stain_channel_np(ihc, name) - ref).max() <= 1e-6
    both = S.stain_channels(_t(ihc))
    assert set(both) == {"h", "e", "dab"}
    assert torch.equal(both["dab"], S.stain_channel(_t(ihc), "dab"))


def test_batched_any_float_dtype(ihc: np.ndarray) -> None:
    x64 = torch.cat([_t(ihc[:64, :64]), _t(ihc[64:128, 64:128])])
    out64 = S.stain_channel(x64, "h")
    out32 = S.stain_channel(x64.float(), "h")
    assert out64.shape == (2, 3, 64, 64) and out32.dtype == torch.float32
    assert torch.allclose(out32.double(), out64, atol=1e-4)
    # unbatched [3, H, W] gives the same as one batch element
    assert torch.allclose(S.stain_channel(x64[1], "h"), out64[1])
    with pytest.raises(TypeError):
        S.rgb_to_hed((x64 * 255).to(torch.uint8))
    with pytest.raises(ValueError):
        S.rgb_to_hed(torch.rand(1, 4, 8, 8))


@pytest.mark.parametrize("value", [0.0, 1.0, 1e-7, 0.999999])
def test_gradients_finite_on_extreme_pixels(value: float) -> None:
    x = torch.full((1, 3, 4, 4), value, dtype=torch.float32, requires_grad=True)
    # mix in saturated single channels too
    with torch.no_grad():
        x[0, 0, 0, 0] = 1.0
        x[0, 1, 0, 0] = 0.0
    for name in ("h", "e", "dab"):
        y = S.stain_channel(x, name)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()


def test_gradients_flow_for_tissue_colours(ihc: np.ndarray) -> None:
    x = _t(ihc[:32, :32], torch.float32).requires_grad_(True)
    S.stain_channel(x, "dab").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_custom_stain_matrix_round_trip() -> None:
    m = S.stain_matrix_from_vectors(h=[0.65, 0.70, 0.29], e=[0.07, 0.99, 0.11], dab=[0.27, 0.57, 0.78])
    assert np.allclose(np.linalg.norm(m, axis=1), 1.0)
    hed = np.random.default_rng(1).random((8, 8, 3)) * 0.3
    rgb = S.hed_to_rgb_np(hed, m)
    back = S.rgb_to_hed_np(rgb, np.linalg.inv(m))
    assert np.allclose(back, hed, atol=1e-9)
    # torch with an explicit matrix equals numpy
    t = S.stain_channel(torch.from_numpy(rgb).permute(2, 0, 1)[None], "e", rgb_from_hed=m)
    assert np.abs(_np(t) - S.stain_channel_np(rgb, "e", m)).max() < 1e-9


def test_missing_vector_completed_by_cross_product() -> None:
    m = S.stain_matrix_from_vectors(h=[0.65, 0.70, 0.29], e=[0.07, 0.99, 0.11])
    h, e = m[0], m[1]
    assert abs(np.dot(m[2], h)) < 1e-9 and abs(np.dot(m[2], e)) < 1e-9 and m[2].sum() >= 0
    with pytest.raises(ValueError, match="at least two"):
        S.stain_matrix_from_vectors(h=[1, 0, 0])
    with pytest.raises(ValueError, match="parallel"):
        S.stain_matrix_from_vectors(h=[1, 1, 0], e=[2, 2, 0])
    with pytest.raises(ValueError, match="unknown stain"):
        S.stain_channel_np(np.zeros((2, 2, 3)), "x")


def test_macenko_recovers_known_vectors() -> None:
    """Render an image from known H and DAB vectors; Macenko must find them again."""
    rng = np.random.default_rng(3)
    h_vec = np.array([0.65, 0.70, 0.29])
    h_vec /= np.linalg.norm(h_vec)
    d_vec = np.array([0.27, 0.57, 0.78])
    d_vec /= np.linalg.norm(d_vec)
    n = 4000
    ch = rng.gamma(2.0, 0.4, n) * (rng.random(n) < 0.7)
    cd = rng.gamma(2.0, 0.4, n) * (rng.random(n) < 0.7)
    od = np.outer(ch, h_vec) + np.outer(cd, d_vec) + 0.16  # keep every pixel above the tissue threshold
    rgb = np.clip(240.0 * np.exp(-od) - 1.0, 0, 255).astype(np.uint8).reshape(40, 100, 3)
    m = S.macenko_stain_matrix(rgb, second="dab")
    assert np.dot(m[0], h_vec) > 0.98
    assert np.dot(m[2], d_vec) > 0.98
    with pytest.raises(ValueError, match="tissue"):
        S.macenko_stain_matrix(np.full((20, 20, 3), 250, np.uint8))


def test_macenko_on_real_ihc_is_close_to_ruifrok(ihc: np.ndarray) -> None:
    m = S.macenko_stain_matrix(ihc, second="dab")
    ref = S.RGB_FROM_HED / np.linalg.norm(S.RGB_FROM_HED, axis=1, keepdims=True)
    assert np.dot(m[0], ref[0]) > 0.9  # haematoxylin
    assert np.dot(m[2], ref[2]) > 0.9  # DAB


def test_second_stain_is_told_apart_on_real_images(real_data) -> None:
    from derestainer.stain.panels import choose_second_stain

    for path in sorted((real_data / "he").iterdir()):
        assert choose_second_stain(read_image(path)) == "e", path.name
    assert choose_second_stain(read_image(real_data / "ihc" / "skimage_ihc.png")) == "dab"
    for path in sorted((real_data / "pairs").glob("*/*/*.jpg")):
        want = "e" if path.stem.endswith("_HE") else "dab"
        assert choose_second_stain(read_image(path)) == want, path.name


def test_separate_command_writes_channels_and_panel(tmp_path, ihc: np.ndarray) -> None:
    from click.testing import CliRunner

    from derestainer.cli import main
    from derestainer.core.io import write_image

    src = write_image(tmp_path / "ihc.png", ihc[:96, :96])
    res = CliRunner().invoke(main, ["separate", str(src), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    h = read_image(tmp_path / "out" / "ihc_H.png")
    assert np.abs(h.astype(float) - np.round(skc.hed2rgb(_keep(skc.rgb2hed(ihc[:96, :96]), 0)) * 255)).max() <= 1
    for name in ("ihc_E.png", "ihc_DAB.png", "ihc_panel.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*tmp*"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["separate", str(bad), "--out", str(tmp_path / "out2")])
    assert res.exit_code != 0 and "bad.png" in res.output and "Traceback" not in res.output


def _keep(hed: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(hed)
    out[..., k] = hed[..., k]
    return out
