"""Each loss against a closed form, a hand-computed case or scikit-image/SciPy; the weighted total."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed
from skimage.metrics import structural_similarity

from derestainer import losses
from derestainer.core.config import LossConfig, load_config
from derestainer.losses import (
    GeneratorLoss,
    active_terms,
    cosine_loss,
    dab_l1_loss,
    focal_loss,
    generator_losses,
    lsgan_d_loss,
    lsgan_g_loss,
    mae_loss,
    pyramid_l1_loss,
    ssim,
    ssim_loss,
    term_weights,
)
from derestainer.models.base import GenOutput


def test_cosine_loss_closed_forms():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[3.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 5.0]])
    # cos = 1, −1, 0  →  1 − cos = 0, 2, 1
    torch.testing.assert_close(cosine_loss(a, b), torch.tensor(1.0))
    x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    xn, yn = x.reshape(4, -1).numpy(), y.reshape(4, -1).numpy()
    ref = np.mean(1 - (xn * yn).sum(1) / np.linalg.norm(xn, axis=1) / np.linalg.norm(yn, axis=1))
    assert abs(cosine_loss(x, y).item() - ref) < 1e-6
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_loss(a, b[:2])


def test_mae_loss():
    a = torch.tensor([[0.5, -1.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, -0.5]])
    torch.testing.assert_close(mae_loss(a, b), torch.tensor((0.5 + 2 + 0 + 0.5) / 4))


def _dab_image_skimage(img01: np.ndarray) -> np.ndarray:
    hed = rgb2hed(img01)
    hed[..., :2] = 0
    return hed2rgb(hed)


def test_dab_l1_loss_matches_skimage(rng):
    fake01 = rng.uniform(0.05, 1.0, size=(2, 16, 16, 3))
    real01 = rng.uniform(0.05, 1.0, size=(2, 16, 16, 3))
    ref = np.mean(np.abs(np.stack([_dab_image_skimage(f) for f in fake01]) - np.stack([_dab_image_skimage(r) for r in real01])))
    def to_model(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2).float() * 2 - 1

    got = dab_l1_loss(to_model(fake01), to_model(real01))
    assert abs(got.item() - ref) < 1e-5


def test_dab_l1_loss_gradient_is_finite_at_saturation():
    fake = torch.tensor([-1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone().requires_grad_()
    fake.data[0, :, 0, 0] = 1.0
    fake.data[0, :, 1, 1] = -1.0
    loss = dab_l1_loss(fake, torch.zeros(1, 3, 4, 4))
    loss.backward()
    assert torch.isfinite(fake.grad).all()


def _smooth_pair(rng, n, h, w, c=3):
    x = ndimage.gaussian_filter(rng.uniform(size=(n, h, w, c)), sigma=(0, 2, 2, 0))
    x = (x - x.min()) / (x.max() - x.min())
    y = np.clip(x + rng.normal(scale=0.1, size=x.shape), 0, 1)
    return x, y


@pytest.mark.parametrize("h,w", [(32, 32), (24, 40)])
def test_ssim_matches_skimage(rng, h, w):
    x, y = _smooth_pair(rng, 2, h, w)
    refs = [structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0, channel_axis=-1) for i in range(2)]
    xt, yt = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).permute(0, 3, 1, 2)
    np.testing.assert_allclose(ssim(xt, yt).numpy(), refs, atol=1e-10)  # float64: same arithmetic
    np.testing.assert_allclose(ssim(xt.float(), yt.float()).numpy(), refs, atol=1e-5)
    # ssim_loss works in model space: 1 − mean SSIM of the [0, 1] images.
    xm = torch.from_numpy(x).permute(0, 3, 1, 2).float() * 2 - 1
    ym = torch.from_numpy(y).permute(0, 3, 1, 2).float() * 2 - 1
    assert abs(ssim_loss(xm, ym).item() - (1 - np.mean(refs))) < 1e-4
    assert abs(ssim_loss(xm, xm).item()) < 1e-6


def test_ssim_is_computed_in_float32_under_autocast(rng):
    x, y = _smooth_pair(rng, 1, 32, 32)
    xt, yt = (torch.from_numpy(a).permute(0, 3, 1, 2).float() for a in (x, y))
    ref = ssim(xt, yt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim(xt.bfloat16(), yt.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ssim(xt.bfloat16().float(), yt.bfloat16().float()))
    assert abs(got - ref).item() < 1e-2


def test_focal_loss_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    target = torch.tensor([0, 3, 2, 1, 1, 0])
    torch.testing.assert_close(focal_loss(logits, target, gamma=0), F.cross_entropy(logits, target))


def test_focal_loss_hand_computed_and_ignore():
    logits = torch.tensor([[np.log(3.0), 0.0], [0.0, 0.0], [5.0, -5.0]])
    target = torch.tensor([0, 1, -1])
    # p_t = 3/4 and 1/2; the third sample is unknown (−1) and ignored.
    expected = (-(0.25**2) * np.log(0.75) - (0.5**2) * np.log(0.5)) / 2
    assert abs(focal_loss(logits, target, gamma=2).item() - expected) < 1e-6
    z = focal_loss(logits.requires_grad_(), torch.full((3,), -1))
    assert z.item() == 0.0
    z.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_lsgan_losses_closed_forms():
    ones, zeros = [torch.ones(2, 1, 6, 6), torch.ones(2, 1, 2, 2)], [torch.zeros(2, 1, 6, 6), torch.zeros(2, 1, 2, 2)]
    assert lsgan_d_loss(ones, zeros).item() == 0.0
    assert lsgan_g_loss(ones).item() == 0.0
    assert lsgan_g_loss(zeros).item() == 1.0
    # Two scales with constants c1, c2: mean over scales of ½((c−1)² + c²) for D and (c−1)² for G.
    r = [torch.full((2, 1, 6, 6), 0.5), torch.full((2, 1, 2, 2), 2.0)]
    f = [torch.full((2, 1, 6, 6), 0.25), torch.full((2, 1, 2, 2), -1.0)]
    d_expected = (0.5 * (0.25 + 0.0625) + 0.5 * (1.0 + 1.0)) / 2
    g_expected = ((0.25 - 1) ** 2 + (-1 - 1) ** 2) / 2
    assert abs(lsgan_d_loss(r, f).item() - d_expected) < 1e-7
    assert abs(lsgan_g_loss(f).item() - g_expected) < 1e-7
    assert lsgan_g_loss(f[0]).item() == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="scales"):
        lsgan_d_loss(r, f[:1])


def _pyramid_scipy(x: np.ndarray, levels: int) -> list[np.ndarray]:
    t = np.exp(-0.5 * np.array([1.0, 0.0, 1.0]))
    t /= t.sum()
    out = [x]
    for _ in range(levels - 1):
        y = out[-1]
        for _ in range(4):  # scipy's 'mirror' = torch's 'reflect' (edge sample not repeated)
            y = ndimage.correlate1d(ndimage.correlate1d(y, t, axis=-1, mode="mirror"), t, axis=-2, mode="mirror")
        out.append(y[..., ::2, ::2])
    return out


@pytest.mark.parametrize("size", [32, 30])
def test_pyramid_l1_matches_scipy_reference(rng, size):
    a, b = rng.uniform(-1, 1, size=(2, 3, size, size)), rng.uniform(-1, 1, size=(2, 3, size, size))
    pa, pb = _pyramid_scipy(a, 4), _pyramid_scipy(b, 4)
    assert [p.shape[-1] for p in pa] == [size, size // 2 + size % 2, -(-size // 4), -(-size // 8)]
    ref = sum(np.abs(x - y).mean() for x, y in zip(pa, pb))
    got = pyramid_l1_loss(torch.from_numpy(a), torch.from_numpy(b), levels=4)
    assert abs(got.item() - ref) < 1e-6
    torch.testing.assert_close(pyramid_l1_loss(torch.from_numpy(a), torch.from_numpy(b), levels=1),
                               mae_loss(torch.from_numpy(a), torch.from_numpy(b)))


def test_paper_weights():
    w = term_weights(load_config("paper").loss)
    assert {k: v for k, v in w.items() if v} == {"h": 2.0, "dab": 2.0, "ssim": 13.0, "mae": 130.0, "cmp": 26.0,
                                                 "level": 5.0, "gan": 1.0}
    assert set(w) >= {"pyramid", "l1", "fm", "vgg", "lowres"}  # the baselines' terms, all off
    assert active_terms(load_config("no_stain").loss) == {"ssim", "mae", "cmp", "level", "gan"}
    assert "dab" not in active_terms(load_config("no_dab").loss) and "h" in active_terms(load_config("no_dab").loss)


def _fake_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    fake = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    ihc = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    he = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    out = GenOutput(ihc=fake, level_logits=torch.randn(3, 4, generator=g, requires_grad=True),
                    h_embed_he=torch.randn(3, 8, generator=g, requires_grad=True), h_embed_ihc=torch.randn(3, 8, generator=g))
    d_out = [torch.randn(3, 1, 6, 6, generator=g, requires_grad=True), torch.randn(3, 1, 2, 2, generator=g, requires_grad=True)]
    cf, cr = torch.randn(3, 5, generator=g, requires_grad=True), torch.randn(3, 5, generator=g)
    return out, he, ihc, torch.tensor([0, -1, 2]), d_out, cf, cr


def test_generator_losses_total_is_the_weighted_sum():
    out, he, ihc, level, d_out, cf, cr = _fake_batch()
    cfg = LossConfig(stain=2, h=1.5, dab=0.5, content=3, ssim=1, mae=2, cmp=0.25, level=4, gan=0.5,
                     focal_gamma=1.0, pyramid=7, pyramid_levels=3, l1=11)
    total, terms = generator_losses(out, he, ihc, level, d_out, cf, cr, cfg)
    expected = {
        "h": cosine_loss(out.h_embed_he, out.h_embed_ihc),
        "dab": dab_l1_loss(out.ihc, ihc),
        "ssim": ssim_loss(out.ihc, ihc),
        "mae": mae_loss(out.ihc, ihc),
        "cmp": cosine_loss(cf, cr),
        "level": focal_loss(out.level_logits, level, gamma=1.0),
        "gan": lsgan_g_loss(d_out),
        "pyramid": pyramid_l1_loss(out.ihc, ihc, 3),
        "l1": mae_loss(out.ihc, ihc),
    }
    weights = {"h": 3.0, "dab": 1.0, "ssim": 3.0, "mae": 6.0, "cmp": 0.75, "level": 4.0, "gan": 0.5, "pyramid": 7.0, "l1": 11.0}
    assert set(terms) == set(expected) | {"total", "h_spread"}  # h_spread: L_H's collapse indicator, not a term
    for k, v in expected.items():
        torch.testing.assert_close(terms[k], v.detach(), msg=k)
        assert not terms[k].requires_grad
    torch.testing.assert_close(total, sum(weights[k] * v for k, v in expected.items()))
    assert total.requires_grad and not terms["total"].requires_grad
    total.backward()
    for t in (out.ihc, out.level_logits, out.h_embed_he, cf, *d_out):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_generator_losses_skips_zero_weights_and_missing_inputs(monkeypatch):
    out, he, ihc, level, d_out, cf, cr = _fake_batch()

    def boom(*a, **k):
        raise AssertionError("a term with weight 0 was computed")

    monkeypatch.setattr(losses.stain_terms, "dab_l1_loss", boom)
    monkeypatch.setattr(losses.baseline_terms, "pyramid_l1_loss", boom)
    total, terms = generator_losses(out, he, ihc, level, d_out, cf, cr, load_config("no_dab").loss)
    assert set(terms) == {"h", "ssim", "mae", "cmp", "level", "gan", "total", "h_spread"}

    # No comparator, no discriminator, no label, no IHC branch: those terms are simply absent.
    out_no_ihc = out._replace(h_embed_ihc=None)
    loss = GeneratorLoss(load_config("no_dab").loss)
    total, terms = loss(out_no_ihc, he, ihc)
    assert set(terms) == {"ssim", "mae", "total"}
    torch.testing.assert_close(total, 13 * ssim_loss(out.ihc, ihc) + 130 * mae_loss(out.ihc, ihc))
    assert "dab" not in loss.active and "gan" in loss.active


def test_vanilla_gan_losses_closed_form() -> None:
    from derestainer.losses import gan_losses, vanilla_d_loss, vanilla_g_loss

    r = [torch.tensor([[0.0, 2.0]]), torch.tensor([[-1.0]])]
    f = [torch.tensor([[1.0, -3.0]]), torch.tensor([[0.5]])]

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    # BCE(x, 1) = softplus(-x); BCE(x, 0) = softplus(x)
    d0 = 0.5 * ((softplus(-0.0) + softplus(-2.0)) / 2 + (softplus(1.0) + softplus(-3.0)) / 2)
    d1 = 0.5 * (softplus(1.0) + softplus(0.5))
    assert vanilla_d_loss(r, f).item() == pytest.approx((d0 + d1) / 2, rel=1e-6)
    g = ((softplus(-1.0) + softplus(3.0)) / 2 + softplus(-0.5)) / 2
    assert vanilla_g_loss(f).item() == pytest.approx(g, rel=1e-6)
    assert gan_losses("vanilla") == (vanilla_d_loss, vanilla_g_loss)
    with pytest.raises(ValueError, match="gan_mode"):
        gan_losses("wgan")
