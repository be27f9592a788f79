"""The loss terms added for the baselines and the stain-loss variants, against brute force and closed forms.

L_H variants (InfoNCE, SimSiam) and their collapse indicator, L_DAB on optical density, GAN label
smoothing, pix2pixHD's feature matching and VGG loss, the focal loss's class weights and the
BCIStainer SSIM window.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from derestainer.core.config import LossConfig, ModelConfig
from derestainer.core.errors import CheckpointError
from derestainer.losses import (
    dab_l1_loss,
    dab_od_loss,
    embedding_spread,
    feature_matching_loss,
    focal_loss,
    generator_losses,
    lsgan_d_loss,
    lsgan_g_loss,
    simsiam_loss,
    spatial_infonce_loss,
    ssim,
    vanilla_g_loss,
    vgg_loss,
)
from derestainer.models.discriminator import build_discriminator
from derestainer.models.generator import DeReStainer
from derestainer.models.vgg import VGG19Features, load_vgg19
from derestainer.stain.matrices import HED_FROM_RGB


def test_spatial_infonce_equals_a_loop_over_queries() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, tau = torch.randn(2, 5, 3, 2, generator=g), torch.randn(2, 5, 3, 2, generator=g), 0.3
    vec = lambda t, n, y, x: t[n, :, y, x] / t[n, :, y, x].norm()  # noqa: E731
    places = [(n, y, x) for n in range(2) for y in range(3) for x in range(2)]
    losses = []
    for pq in places:
        qv = vec(q, *pq)
        logits = [float(qv @ vec(k, *pk)) / tau for pk in places]
        pos = logits[places.index(pq)]
        losses.append(-pos + math.log(sum(math.exp(v) for v in logits)))
    assert float(spatial_infonce_loss(q, k, tau)) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # the positive only: no negative, no loss; identical maps score better than shuffled ones
    assert float(spatial_infonce_loss(q[:1, :, :1, :1], k[:1, :, :1, :1], tau)) == pytest.approx(0.0, abs=1e-6)
    assert spatial_infonce_loss(q, q, tau) < spatial_infonce_loss(q, k, tau)
    with pytest.raises(ValueError, match="temperature"):
        spatial_infonce_loss(q, k, 0.0)


def test_simsiam_loss_closed_form_and_stop_gradient() -> None:
    p_a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p_b = torch.tensor([[0.0, 2.0]], requires_grad=True)
    z_a = torch.tensor([[0.0, 3.0]], requires_grad=True)
    z_b = torch.tensor([[1.0, 1.0]], requires_grad=True)
    # ½[(1 − cos(p_a, z_b)) + (1 − cos(p_b, z_a))] = ½[(1 − 1/√2) + 0]
    loss = simsiam_loss(p_a, z_a, p_b, z_b)
    assert float(loss.detach()) == pytest.approx(0.5 * (1 - 1 / math.sqrt(2)), rel=1e-6)
    loss.backward()
    assert z_a.grad is None and z_b.grad is None  # the targets are detached
    assert p_a.grad is not None and float(p_a.grad.abs().sum()) > 0


def test_embedding_spread_is_zero_for_collapse_and_one_over_root_n_for_orthogonal_rows() -> None:
    assert float(embedding_spread(torch.ones(6, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]))) == pytest.approx(0.0, abs=1e-7)
    # one-hot rows: each column holds a single 1 among N values, unbiased std 1/√N
    assert float(embedding_spread(torch.eye(5) * 3.0)) == pytest.approx(1 / math.sqrt(5), rel=1e-6)
    assert float(embedding_spread(torch.ones(1, 4))) == 0.0  # one sample: no spread to measure


def _dab_od_numpy(rgb: np.ndarray) -> np.ndarray:
    od = np.log(np.maximum(rgb, 1e-6)) / np.log(1e-6)
    return od @ HED_FROM_RGB[:, 2]


def test_dab_od_loss_equals_numpy_and_has_a_gradient_where_dab_is_absent() -> None:
    rng = np.random.default_rng(0)
    fake_u, real_u = rng.uniform(0.05, 1.0, (2, 8, 8, 3)), rng.uniform(0.05, 1.0, (2, 8, 8, 3))
    expected = np.abs(_dab_od_numpy(fake_u) - _dab_od_numpy(real_u)).mean()
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() * 2 - 1  # noqa: E731
    fake, real = to_t(fake_u), to_t(real_u)
    assert float(dab_od_loss(fake, real)) == pytest.approx(expected, rel=1e-4)

    # a hematoxylin-blue pixel has no DAB: the clamped L_DAB has no gradient there, the OD one has
    blue = torch.tensor([0.35, 0.45, 0.85]).view(1, 3, 1, 1).expand(1, 3, 4, 4) * 2 - 1
    brown = torch.tensor([0.55, 0.35, 0.15]).view(1, 3, 1, 1).expand(1, 3, 4, 4) * 2 - 1
    assert float(_dab_od_numpy(np.array([0.35, 0.45, 0.85]))) < 0  # negative before the clamp
    grads = []
    for fn in (dab_l1_loss, dab_od_loss):
        x = blue.clone().requires_grad_(True)
        fn(x, brown).backward()
        assert x.grad is not None
        grads.append(float(x.grad.abs().sum()))
    assert grads[0] == 0.0 and grads[1] > 0.0


def test_gan_label_smoothing_draws_fresh_targets() -> None:
    f = torch.randn(2, 1, 5, 5)
    r = torch.randn(2, 1, 5, 5)
    torch.manual_seed(3)
    got = lsgan_g_loss([f], smooth=0.1)
    torch.manual_seed(3)
    noise = torch.rand_like(f) * 0.1
    torch.testing.assert_close(got, (f - (1 - noise)).square().mean())
    torch.manual_seed(4)
    got_d = lsgan_d_loss([r], [f], smooth=0.1)
    torch.manual_seed(4)
    n_r, n_f = torch.rand_like(r) * 0.1, torch.rand_like(f) * 0.1
    torch.testing.assert_close(got_d, 0.5 * ((r - (1 - n_r)).square().mean() + (f - n_f).square().mean()))
    torch.manual_seed(5)
    got_v = vanilla_g_loss(f, smooth=0.1)
    torch.manual_seed(5)
    t = 1 - torch.rand_like(f) * 0.1
    torch.testing.assert_close(got_v, torch.nn.functional.binary_cross_entropy_with_logits(f, t))
    torch.testing.assert_close(lsgan_g_loss([f]), (f - 1).square().mean())  # smooth 0: the plain targets


def test_feature_matching_equals_a_hand_computation_and_uses_every_intermediate_layer() -> None:
    d = build_discriminator(ModelConfig(ndf=4, d_layers=3, d_scales=2)).eval()
    he, a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    fa, fb = d(he, a, features=True), d(he, b, features=True)
    assert [len(s) for s in fa] == [5, 5]  # n_layers + 1 = 4 intermediate maps, then the logits
    for s, logits in zip(fa, d(he, a)):
        torch.testing.assert_close(s[-1], logits)
    inter_a, inter_b = [s[:-1] for s in fa], [s[:-1] for s in fb]
    hand = sum((4.0 / 4) * (x - y).abs().mean() for sa, sb in zip(inter_a, inter_b) for x, y in zip(sa, sb)) / 2
    torch.testing.assert_close(feature_matching_loss(inter_a, inter_b), hand)
    assert float(feature_matching_loss(inter_a, inter_a).detach()) == 0.0


def test_unconditional_discriminator_sees_the_ihc_only() -> None:
    d = build_discriminator(ModelConfig(ndf=4, d_layers=2, d_scales=1, d_input="ihc", d_norm="instance")).eval()
    he1, he2, ihc = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(d(he1, ihc)[0], d(he2, ihc)[0])
    assert d.discriminators[0].model[0].in_channels == 3


def test_focal_class_weights_and_bcistainer_ssim_window() -> None:
    logits, target = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]]), torch.tensor([0, 3])
    alpha = (0.5, 0.2, 0.2, 0.1)
    p = torch.softmax(logits, 1)[torch.arange(2), target]
    hand = (-(torch.tensor([0.5, 0.1]) * (1 - p) ** 2 * p.log())).mean()
    torch.testing.assert_close(focal_loss(logits, target, gamma=2.0, alpha=alpha), hand)
    with pytest.raises(ValueError, match="class weights"):
        focal_loss(logits, target, alpha=(1.0, 1.0))
    # SSIM with a 9-tap Gaussian of σ 2.375 ('valid'), against a direct NumPy computation
    rng = np.random.default_rng(1)
    x, y = rng.uniform(size=(20, 20)), rng.uniform(size=(20, 20))
    t = np.arange(9) - 4.0
    g = np.exp(-0.5 * (t / 2.375) ** 2)
    g /= g.sum()
    w = np.outer(g, g)
    win = lambda a: np.array([[np.sum(a[i:i + 9, j:j + 9] * w) for j in range(12)] for i in range(12)])  # noqa: E731
    mx, my = win(x), win(y)
    sxx, syy, sxy = win(x * x) - mx**2, win(y * y) - my**2, win(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean()
    got = ssim(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None], win_size=9, sigma=2.375)
    assert float(got) == pytest.approx(ref, rel=1e-9)


def test_vgg_loss_weights_and_local_weights_file(tmp_path) -> None:
    fa = [torch.full((1, 1, 2, 2), float(i)) for i in range(5)]
    fb = [torch.zeros(1, 1, 2, 2)] * 5
    assert float(vgg_loss(fa, fb)) == pytest.approx(sum(i * w for i, w in zip(range(5), (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1))))
    from torchvision.models import vgg19

    torch.manual_seed(0)
    full = vgg19(weights=None)
    path = tmp_path / "vgg19.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))  # classifier.* included, ignored
    model = load_vgg19(path)
    x = torch.randn(1, 3, 32, 32)
    outs = model(x)
    ref, h = [], x
    for i, layer in enumerate(full.features[:30]):
        h = layer(h)
        if i + 1 in (2, 7, 12, 21, 30):
            ref.append(h)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)
    assert not any(p.requires_grad for p in model.parameters())
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(3, 3, 3, 3)}, str(bad))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_vgg19(bad)
    with pytest.raises(CheckpointError, match="no such"):
        load_vgg19(tmp_path / "missing.safetensors")
    assert isinstance(VGG19Features(), torch.nn.Module)


@pytest.mark.parametrize("h_mode", ["cosine", "simsiam", "infonce"])
def test_h_modes_train_the_h_head_and_report_its_spread(h_mode: str) -> None:
    torch.manual_seed(0)
    g = DeReStainer(ngf=4, n_down=2, n_head_down=1, n_fusion_blocks=1, h_predictor=8 if h_mode == "simsiam" else 0)
    he, ihc = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    out = g(he, ihc)
    assert out.aux is not None and out.aux["h_map_he"].shape == (3, 16, 4, 4)
    cfg = LossConfig(h_mode=h_mode, content=0.0, level=0.0, gan=0.0, dab=0.0, cmp=0.0)
    total, terms = generator_losses(out, he, ihc, None, None, None, None, cfg)
    assert set(terms) == {"h", "h_spread", "total"} and torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in g.f_h.parameters()]
    assert all(gr is not None and float(gr.abs().sum()) > 0 for gr in grads)
    if h_mode == "simsiam":
        assert g.h_predictor is not None and all(p.grad is not None for p in g.h_predictor.parameters())
    with pytest.raises(ValueError, match="h_mode"):
        generator_losses(out, he, ihc, None, None, None, None, LossConfig(h_mode="nope", content=0.0))


@pytest.mark.parametrize("override, message", [
    ("loss.h_mode=x", "h_mode"), ("loss.dab_mode=x", "dab_mode"), ("loss.h_tau=0", "h_tau"),
    ("loss.gan_smooth=2", "gan_smooth"), ("loss.cmp_start=-0.1", "cmp_start"), ("loss.ssim_win=8", "ssim_win"),
    ("loss.focal_alpha=-1,2", "focal_alpha"), ("model.d_input=foo", "d_input"), ("model.d_norm=group", "d_norm"),
    ("model.h_predictor=-1", "h_predictor"), ("train.ema=1", "ema"), ("train.ema_start=-3", "ema"),
])
def test_new_options_are_range_checked(override: str, message: str) -> None:
    from derestainer.core.config import load_config
    from derestainer.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("paper", [override])
    assert load_config("paper", ["loss.focal_alpha=0.5,0.2,0.2,0.1"]).loss.focal_alpha == (0.5, 0.2, 0.2, 0.1)


def test_feature_matching_runs_in_float32_on_nested_half_inputs() -> None:
    f = [[torch.randn(1, 2, 4, 4).bfloat16(), torch.randn(1, 2, 2, 2).bfloat16()]]
    r = [[torch.randn(1, 2, 4, 4).bfloat16(), torch.randn(1, 2, 2, 2).bfloat16()]]
    got = feature_matching_loss(f, r)
    assert got.dtype == torch.float32
    hand = sum(2.0 * (a.float() - b.float()).abs().mean() for a, b in zip(f[0], r[0]))
    torch.testing.assert_close(got, hand)
