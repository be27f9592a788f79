"""Modulated convolution, SimAM and conv blocks against references written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from derestainer.layers import (
    ConvNormAct,
    DownBlock,
    ModulatedConv2d,
    ResidualBlock,
    SimAM,
    UpBlock,
    demodulation_coefficients,
    make_norm,
    modulated_conv2d,
    simam,
)


def _loop_reference(x, weight, styles, demodulate, eps, padding, padding_mode):
    """One F.conv2d per sample with explicitly modulated and demodulated weights (the paper's formula)."""
    outs = []
    for n in range(x.shape[0]):
        w = weight * (styles[n] + 1.0)[None, :, None, None]
        if demodulate:
            w = w / torch.sqrt((w**2).sum(dim=(1, 2, 3), keepdim=True) + eps)
        xi = x[n : n + 1]
        if padding_mode != "zeros":
            xi = F.pad(xi, [padding] * 4, mode=padding_mode)
            outs.append(F.conv2d(xi, w))
        else:
            outs.append(F.conv2d(xi, w, padding=padding))
    return torch.cat(outs)


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("k", [1, 3])
def test_modulated_conv_fused_equals_unfused_and_loop(demodulate, padding_mode, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 5, k, k, generator=g, dtype=torch.float64)
    styles = torch.randn(3, 5, generator=g, dtype=torch.float64)
    kw = dict(demodulate=demodulate, eps=1e-8, padding=k // 2, padding_mode=padding_mode)
    fused = modulated_conv2d(x, weight, styles, fused=True, **kw)
    unfused = modulated_conv2d(x, weight, styles, fused=False, **kw)
    ref = _loop_reference(x, weight, styles, demodulate, 1e-8, k // 2, padding_mode)
    assert fused.shape == (3, 4, 9, 7)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(unfused, ref, rtol=1e-10, atol=1e-10)


def test_modulated_conv_gradients_agree_between_paths():
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64),
            0.3 * torch.randn(2, 3, generator=g, dtype=torch.float64)]
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in base]
        y = modulated_conv2d(*leaves, padding=1, padding_mode="reflect", fused=fused)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_demodulation_gives_unit_norm_weights():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    styles = torch.randn(2, 4, generator=g, dtype=torch.float64)
    d = demodulation_coefficients(weight, styles, eps=0.0)
    w = weight[None] * (styles + 1)[:, None, :, None, None] * d[:, :, None, None, None]
    torch.testing.assert_close(w.square().sum(dim=(2, 3, 4)), torch.ones(2, 6, dtype=torch.float64))


def test_modulated_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match="channel mismatch"):
        modulated_conv2d(torch.zeros(2, 3, 4, 4), torch.zeros(1, 4, 3, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="styles"):
        modulated_conv2d(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 3, 3), torch.zeros(3))


def test_modulated_conv_module_starts_as_plain_demodulated_conv():
    torch.manual_seed(0)
    layer = ModulatedConv2d(4, 6, 3, style_dim=4, padding_mode="reflect")
    assert torch.count_nonzero(layer.affine.weight) == 0 and torch.count_nonzero(layer.affine.bias) == 0
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 8, 8)
    style = torch.softmax(torch.randn(2, 4), dim=1)
    w = layer.weight / torch.sqrt(layer.weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    ref = F.conv2d(F.pad(x, [1] * 4, mode="reflect"), w, layer.bias)
    for fused in (True, False):
        layer.fused = fused
        torch.testing.assert_close(layer(x, style), ref, rtol=1e-5, atol=1e-5)


def test_modulated_conv_module_uses_its_styles():
    torch.manual_seed(0)
    layer = ModulatedConv2d(3, 3, 3, style_dim=2)
    with torch.no_grad():
        layer.affine.weight.normal_()
    x = torch.randn(1, 3, 6, 6).expand(2, -1, -1, -1)
    y = layer(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert not torch.allclose(y[0], y[1], atol=1e-4)


def _simam_numpy(x: np.ndarray, lam: float) -> np.ndarray:
    out = np.empty_like(x)
    n_, c_, h, w = x.shape
    for n in range(n_):
        for c in range(c_):
            t = x[n, c]
            mu = t.sum() / (h * w)
            d = (t - mu) ** 2
            v = d.sum() / (h * w - 1)
            e_inv = d / (4 * (v + lam)) + 0.5
            out[n, c] = t / (1 + np.exp(-e_inv))
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 2, 2)])
def test_simam_matches_formula(shape, rng):
    x = rng.normal(size=shape) * 3
    ref = _simam_numpy(x, 1e-4)
    torch.testing.assert_close(simam(torch.from_numpy(x)).numpy(), ref, rtol=1e-12, atol=1e-12)
    assert len(list(SimAM().parameters())) == 0
    torch.testing.assert_close(SimAM(lam=0.5)(torch.from_numpy(x)).numpy(), _simam_numpy(x, 0.5))


def test_simam_on_single_pixel_is_finite():
    x = torch.randn(2, 3, 1, 1)
    # d = 0 everywhere, so the weight is sigmoid(0.5).
    torch.testing.assert_close(simam(x), x * torch.sigmoid(torch.tensor(0.5)))


def test_blocks_shapes_and_bias():
    x = torch.randn(2, 4, 10, 7)
    assert DownBlock(4, 8)(x).shape == (2, 8, 5, 4)
    assert UpBlock(4, 3)(x).shape == (2, 3, 20, 14)
    assert UpBlock(4, 3, mode="transpose")(x).shape == (2, 3, 20, 14)
    assert ResidualBlock(4)(x).shape == x.shape
    assert ConvNormAct(4, 5, norm="batch")[0].bias is None
    assert ConvNormAct(4, 5, norm="none")[0].bias is not None
    with pytest.raises(ValueError, match="norm"):
        make_norm("group", 4)
    with pytest.raises(ValueError, match="mode"):
        UpBlock(4, 4, mode="bilinear")


def test_residual_block_is_identity_when_its_body_is_zero():
    block = ResidualBlock(4, norm="none")
    with torch.no_grad():
        for p in block.body[1].parameters():
            p.zero_()
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(block(x), x)


def test_nearest_up_block_has_no_checkerboard():
    # Why the generator up-samples by nearest + conv: on a constant input the output's interior is
    # constant, whereas a stride-2 3×3 transposed convolution prints a 2-periodic pattern.
    torch.manual_seed(0)
    x = torch.ones(1, 4, 8, 8)
    near = UpBlock(4, 4, norm="none").eval()(x)[..., 2:-2, 2:-2]
    trans = UpBlock(4, 4, norm="none", mode="transpose").eval()(x)[..., 2:-2, 2:-2]
    assert torch.allclose(near, near[..., :1, :1].expand_as(near), atol=1e-6)
    assert (trans[..., 0::2, 0::2] - trans[..., 1::2, 1::2]).abs().max() > 1e-3
