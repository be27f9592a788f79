"""DeReStainer generator and discriminators: shapes, conditioning, gradients, stain matrix, registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from derestainer.core.config import LossConfig, ModelConfig, load_config
from derestainer.core.errors import ConfigError
from derestainer.core.ranges import signed_to_unit, unit_to_signed
from derestainer.layers import simam
from derestainer.losses import generator_losses
from derestainer.models.base import GenOutput
from derestainer.models.destainer import load_stain_matrix
from derestainer.models.discriminator import (
    MultiScaleDiscriminator,
    PatchDiscriminator,
    build_discriminator,
    downsample2x,
)
from derestainer.models.fusion import FusionBlock
from derestainer.models.generator import DeReStainer, build_generator
from derestainer.models.registry import create_generator, list_generators
from derestainer.stain import RGB_FROM_HED, stain_channel

TINY = dict(ngf=8, n_fusion_blocks=2)


def _images(n: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w or h, generator=g) * 2 - 1


@pytest.mark.parametrize("size", [32, 64, 96, (64, 96)])
@pytest.mark.parametrize("encoder_input", ["h", "rgb", "h+rgb"])
def test_generator_shapes(size, encoder_input):
    h, w = size if isinstance(size, tuple) else (size, size)
    torch.manual_seed(0)
    g = DeReStainer(encoder_input=encoder_input, **TINY)
    he, ihc = _images(2, h, w, 1), _images(2, h, w, 2)
    out = g(he, ihc)
    assert isinstance(out, GenOutput)
    assert out.ihc.shape == (2, 3, h, w)
    assert out.ihc.abs().max() <= 1
    assert out.level_logits.shape == (2, 4)
    assert out.h_embed_he.shape == out.h_embed_ihc.shape == (2, 64)
    assert g.destainer.stem[0].in_channels == (6 if encoder_input == "h+rgb" else 3)
    assert g(he).h_embed_ihc is None


def test_generator_options():
    g = DeReStainer(ngf=4, n_down=2, n_head_down=1, n_fusion_blocks=1, n_levels=3, h_embed_dim=7, norm="none")
    out = g(_images(2, 16), _images(2, 16, seed=1))
    assert out.ihc.shape == (2, 3, 16, 16)
    assert out.level_logits.shape == (2, 3) and out.h_embed_he.shape == (2, 7)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    assert g.fusion.blocks[0].conv1.affine.in_features == 3


def test_generator_refuses_bad_sizes_and_instance_norm():
    g = DeReStainer(**TINY)
    with pytest.raises(ValueError, match="divisible by 8"):
        g(_images(1, 36))
    with pytest.raises(ValueError, match="at least 16"):
        g(_images(1, 8))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        g(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="same shape"):
        g(_images(1, 32), _images(1, 64))
    with pytest.raises(ValueError, match="seams"):
        DeReStainer(norm="instance", **TINY)
    with pytest.raises(ValueError, match="encoder_input"):
        DeReStainer(encoder_input="lab", **TINY)


def test_encoder_input_is_the_h_channel_image():
    g = DeReStainer(**TINY)
    x = _images(2, 32)
    expected = unit_to_signed(stain_channel(signed_to_unit(x), "h"))
    torch.testing.assert_close(g.destainer.encoder_in(x), expected, rtol=1e-5, atol=1e-5)
    g6 = DeReStainer(encoder_input="h+rgb", **TINY)
    torch.testing.assert_close(g6.destainer.encoder_in(x), torch.cat([expected, x], 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.stain_image(x, "dab"), unit_to_signed(stain_channel(signed_to_unit(x), "dab")),
                               rtol=1e-5, atol=1e-5)


def test_fusion_block_with_zero_styles_is_demodulated_plain_conv():
    torch.manual_seed(0)
    block = FusionBlock(6, style_dim=4)
    with torch.no_grad():
        block.conv1.bias.normal_()
        block.conv2.bias.normal_()
    x = torch.randn(2, 6, 8, 8)
    styles = torch.softmax(torch.randn(2, 4), 1)  # ignored: the affine maps start at zero

    def plain(conv, t):
        w = conv.weight / torch.sqrt(conv.weight.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        return F.conv2d(F.pad(t, [1] * 4, mode="reflect"), w, conv.bias)

    ref = x + simam(plain(block.conv2, F.leaky_relu(plain(block.conv1, x), 0.2)))
    torch.testing.assert_close(block(x, styles), ref, rtol=1e-5, atol=1e-5)


def test_fused_and_unfused_generator_agree():
    torch.manual_seed(0)
    g = DeReStainer(**TINY).eval()
    with torch.no_grad():
        for m in g.fusion.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_()
    x = _images(3, 32)
    with torch.no_grad():
        a = g(x).ihc
        g.set_fused_modconv(False)
        assert not g.fusion.blocks[1].conv2.fused
        b = g(x).ihc
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _TinyComparator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).mean(dim=(2, 3))


def test_gradients_reach_every_generator_parameter_and_no_frozen_one():
    torch.manual_seed(0)
    g = DeReStainer(**TINY)
    d = MultiScaleDiscriminator(ndf=4, n_layers=2, num_scales=2)
    comparator = _TinyComparator().requires_grad_(False)
    he, ihc = _images(4, 32, seed=1), _images(4, 32, seed=2)
    level = torch.tensor([0, 1, 3, -1])
    out = g(he, ihc)
    total, terms = generator_losses(out, he, ihc, level, d(he, out.ihc), comparator(out.ihc), comparator(ihc),
                                    LossConfig())
    assert set(terms) == {"h", "dab", "ssim", "mae", "cmp", "level", "gan", "total", "h_spread"}
    total.backward()
    for name, p in g.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in comparator.parameters())
    assert {n for n, _ in g.named_buffers()} >= {"destainer.separation.rgb_from_hed", "destainer.separation.hed_from_rgb"}


def _lh_grads(g: DeReStainer, he, ihc, detach: bool):
    g.zero_grad()
    out = g(he, ihc)
    other = out.h_embed_ihc.detach() if detach else out.h_embed_ihc
    (1 - F.cosine_similarity(out.h_embed_he, other).mean()).backward()
    return {n: p.grad.clone() for n, p in g.named_parameters() if p.grad is not None}


def test_stop_ihc_grad_blocks_the_ihc_branch():
    torch.manual_seed(0)
    g = DeReStainer(stop_ihc_grad=True, **TINY)
    he, ihc = _images(2, 32, seed=1), _images(2, 32, seed=2).requires_grad_()
    out = g(he, ihc)
    assert not out.h_embed_ihc.requires_grad
    stopped = _lh_grads(g, he, ihc, detach=False)
    assert ihc.grad is None

    g.stop_ihc_grad = False
    out = g(he, ihc)
    assert out.h_embed_ihc.requires_grad
    flowing = _lh_grads(g, he, ihc, detach=False)
    assert ihc.grad is not None and ihc.grad.abs().sum() > 0
    detached = _lh_grads(g, he, ihc, detach=True)
    # Stopping the IHC branch = treating its embedding as a constant; letting it flow changes the encoder's gradient.
    for n in stopped:
        torch.testing.assert_close(stopped[n], detached[n], rtol=1e-5, atol=1e-7)
    w = "destainer.stem.0.weight"
    assert not torch.allclose(flowing[w], stopped[w])


def test_ihc_branch_does_not_move_batchnorm_running_stats():
    torch.manual_seed(0)
    a = DeReStainer(**TINY)
    b = DeReStainer(**TINY)
    b.load_state_dict(a.state_dict())
    he = _images(2, 32, seed=1)
    a(he)
    b(he, _images(2, 32, seed=2))
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    assert a.destainer.stem[1].momentum == 0.1


def test_stain_matrix_from_files(tmp_path):
    m = np.array([[0.6, 0.7, 0.3], [0.1, 0.9, 0.2], [0.3, 0.6, 0.7]])
    np.save(tmp_path / "m.npy", m)
    (tmp_path / "m.json").write_text(json.dumps({"rgb_from_hed": m.tolist()}))
    (tmp_path / "v.json").write_text(json.dumps({"h": m[0].tolist(), "dab": m[2].tolist()}))
    for name in ("m.npy", "m.json"):
        np.testing.assert_allclose(load_stain_matrix(str(tmp_path / name)), m)
    v = load_stain_matrix(str(tmp_path / "v.json"))
    np.testing.assert_allclose(v[0], m[0] / np.linalg.norm(m[0]))
    np.testing.assert_allclose(load_stain_matrix("ruifrok"), RGB_FROM_HED)

    g = build_generator(ModelConfig(stain_matrix=str(tmp_path / "m.npy"), **TINY))
    np.testing.assert_allclose(g.destainer.separation.rgb_from_hed.numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(g.destainer.separation.hed_from_rgb.numpy(), np.linalg.inv(m), rtol=1e-5)
    assert "destainer.separation.rgb_from_hed" in g.state_dict()

    (tmp_path / "bad.json").write_text("[[1, 2, 3], [2, 4, 6], [0, 0, 1]]")
    with pytest.raises(ValueError, match="bad.json.*singular"):
        load_stain_matrix(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="missing.npy: stain matrix file does not exist"):
        load_stain_matrix(str(tmp_path / "missing.npy"))
    (tmp_path / "m.txt").write_text("1")
    with pytest.raises(ValueError, match="m.txt"):
        load_stain_matrix(str(tmp_path / "m.txt"))


def test_registry_and_save_load_roundtrip(tmp_path):
    from derestainer.models.files import load_generator, save_generator

    assert "derestainer" in list_generators()
    cfg = load_config("tiny")
    g = create_generator(cfg.model)
    assert isinstance(g, DeReStainer)
    g(_images(2, 32))  # move the BatchNorm running statistics away from their initial values
    path = save_generator(tmp_path / "g.safetensors", g, cfg)
    g2, _, _ = load_generator(path)
    x = _images(2, 32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(g.eval()(x).ihc, g2(x).ihc)


def test_a_weight_of_the_wrong_shape_is_a_checkpoint_error(tmp_path):
    from derestainer.core.errors import CheckpointError
    from derestainer.core.fileformat import load_tensors, save_tensors
    from derestainer.models.files import load_generator, save_generator

    cfg = load_config("tiny")
    path = save_generator(tmp_path / "g.safetensors", create_generator(cfg.model), cfg)
    tensors, meta = load_tensors(path)
    key = next(k for k, v in tensors.items() if v.ndim == 4 and v.shape[0] != v.shape[1])
    tensors[key] = tensors[key].transpose(0, 1).contiguous()  # a permuted convolution weight
    bad = save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: weights do not fit model 'derestainer'"):
        load_generator(bad)


@pytest.mark.parametrize("n_layers,rf", [(1, 16), (2, 34), (3, 70)])
def test_patch_discriminator_receptive_field(n_layers, rf):
    torch.manual_seed(0)
    d = PatchDiscriminator(6, ndf=4, n_layers=n_layers).eval()
    x = torch.randn(1, 6, 160, 160, requires_grad=True)
    out = d(x)
    i, j = out.shape[-2] // 2, out.shape[-1] // 2
    out[0, 0, i, j].backward()
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3)))
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2)))
    assert rows.max() - rows.min() + 1 == rf
    assert cols.max() - cols.min() + 1 == rf


@pytest.mark.parametrize("size", [32, 64, 256])
def test_patch_discriminator_output_size(size):
    d = PatchDiscriminator(6, ndf=4, n_layers=3)
    assert d(torch.zeros(1, 6, size, size)).shape == (1, 1, size // 8 - 2, size // 8 - 2)


def test_multiscale_discriminator():
    torch.manual_seed(0)
    d = build_discriminator(ModelConfig(ndf=4, d_layers=2, d_scales=2)).eval()
    he, ihc = _images(2, 64), _images(2, 64, seed=1)
    outs = d(he, ihc)
    assert [o.shape for o in outs] == [(2, 1, 14, 14), (2, 1, 6, 6)]
    x = torch.cat([he, ihc], 1)
    torch.testing.assert_close(outs[1], d.discriminators[1](downsample2x(x)))
    torch.testing.assert_close(downsample2x(x)[..., 1:-1, 1:-1], F.avg_pool2d(x, 3, 2, 1)[..., 1:-1, 1:-1])
    assert d.discriminators[0] is not d.discriminators[1]
    assert len(build_discriminator(ModelConfig(ndf=4, d_scales=3)).discriminators) == 3


@pytest.mark.gpu
def test_generator_on_cuda_bf16_channels_last():
    torch.manual_seed(0)
    g = DeReStainer(**TINY).cuda().to(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in g.fusion.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_()
    he = _images(2, 64, seed=1).cuda().contiguous(memory_format=torch.channels_last)
    ihc = _images(2, 64, seed=2).cuda().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = g(he, ihc)
        total, _terms = generator_losses(out, he, ihc, torch.tensor([1, 2], device="cuda"), None, None, None, LossConfig())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters() if p.grad is not None)
    g.eval()
    with torch.no_grad():
        a = g(he).ihc
        g.set_fused_modconv(False)
        torch.testing.assert_close(g(he).ihc, a, rtol=1e-3, atol=1e-3)
