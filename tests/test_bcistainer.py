"""BCIStainer's generator (models/baselines/bcistainer.py) and its preset (configs/bcistainer.yaml)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from derestainer.core.config import load_config
from derestainer.layers.modulated_conv import ModulatedConv2d
from derestainer.models.base import GenOutput
from derestainer.models.baselines import bcistainer  # registers "bcistainer"
from derestainer.models.baselines.bcistainer import BCIStainerGenerator
from derestainer.models.registry import create_generator, list_generators


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models only lose from more, worst of all on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tiny(n_style_down: int = 2, **kw: object) -> BCIStainerGenerator:
    torch.manual_seed(0)
    return BCIStainerGenerator(ngf=4, n_down=3, n_style_down=n_style_down, n_blocks=2, **kw)  # type: ignore[arg-type]


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def expected_params(ngf: int, n_down: int, n_style_down: int, n_blocks: int, n_levels: int = 4) -> int:
    """Parameters of the batch-norm model counted layer by layer (conv weights, BN scale and shift,
    biases only where no batch norm follows), independently of the module code."""
    w = ngf * 2**n_down
    count = 3 * ngf * 49 + 2 * ngf  # stem: 7×7 conv without bias, BN
    for i in range(n_down):  # encoder: 3×3 stride-2 convs + BN; decoder: transposed 3×3 convs + BN
        a, b = ngf * 2**i, ngf * 2 ** (i + 1)
        count += a * b * 9 + 2 * b + b * a * 9 + 2 * a
    count += n_style_down * (w * w * 9 + 2 * w)  # style encoder at constant width
    count += w * n_levels + n_levels  # level head (dropout has none)
    count += n_blocks * 2 * (w * w * 9 + w * w + w)  # two modulated convs (no bias) + their affine maps
    count += w * 3 * 9 + 3  # low-resolution head, 3×3 conv with bias
    count += ngf * 3 * 49 + 3  # output head, 7×7 conv with bias
    return count


@pytest.mark.parametrize(("size", "n_style_down"), [(32, 2), (64, 3)])
def test_shapes(size: int, n_style_down: int) -> None:
    g = _tiny(n_style_down)
    out = g(_images(2, size))
    assert isinstance(out, GenOutput)
    assert out.ihc.shape == (2, 3, size, size)
    assert out.level_logits is not None and out.level_logits.shape == (2, 4)
    assert out.aux is not None and out.aux["ihc_low"].shape == (2, 3, size // 8, size // 8)
    assert out.ihc.abs().max() <= 1 and out.aux["ihc_low"].abs().max() <= 1  # tanh heads
    g.eval()
    with torch.no_grad():
        again = g(_images(1, size), ihc=_images(1, size, seed=1))
    assert again.aux is not None and again.aux["ihc_low"].shape == (1, 3, size // 8, size // 8)


def test_without_lowres_head() -> None:
    out = _tiny(output_lowres=False)(_images(2, 32))
    assert out.aux is None and out.ihc.shape == (2, 3, 32, 32)


def test_style_vector_drives_the_modulated_blocks() -> None:
    g = _tiny()  # training mode: batch statistics keep the activations at unit scale from the start
    he = _images(2, 32)
    with torch.no_grad():
        feat, style = g.encode(he)
        assert style.shape == (2, g.style_dim) == (2, 32)
        base, low = g.decode(feat, style)
        assert torch.allclose(base, g(he).ihc, atol=1e-6)
        other, other_low = g.decode(feat, style + torch.randn_like(style))
        assert (other - base).abs().max() > 1e-2 * base.abs().max()
        assert low is not None and other_low is not None
        assert (other_low - low).abs().max() > 1e-2 * low.abs().max()
        # the level head is a side branch: its output does not reach the image
        g.eval()
        before = g(he)
        for p in g.level_head.parameters():
            p.add_(1.0)
        after = g(he)
    assert before.level_logits is not None and after.level_logits is not None
    assert not torch.allclose(before.level_logits, after.level_logits)
    assert torch.equal(before.ihc, after.ihc)


def test_their_initialisation() -> None:
    g = BCIStainerGenerator(ngf=8, n_style_down=1, n_blocks=2)
    mods = [m for m in g.modules() if isinstance(m, ModulatedConv2d)]
    assert len(mods) == 4 and all(m.bias is None for m in mods)  # no bias under batch norm
    for m in mods:
        assert 0.015 < m.weight.std().item() < 0.025
        assert 0.015 < m.affine.weight.std().item() < 0.025  # their nn.Linear style maps, N(0, 0.02)
        assert torch.count_nonzero(m.affine.bias) == 0


@pytest.mark.parametrize(
    ("shape", "n_style_down"),
    [((1, 3, 36, 36), 2), ((1, 3, 32, 44), 2), ((1, 3, 32, 32), 3), ((1, 3, 16, 16), 2), ((1, 1, 32, 32), 2), ((3, 32, 32), 2)],
)
def test_wrong_input_size(shape: tuple[int, ...], n_style_down: int) -> None:
    g = _tiny(n_style_down)
    with pytest.raises(ValueError, match="he"):
        g(torch.zeros(shape))


def test_min_size_is_the_smallest_that_runs() -> None:
    for n in range(5):
        g = _tiny(n).eval()
        assert g.size_multiple == 8 and g.min_size % 8 == 0
        with torch.no_grad():
            g(torch.zeros(1, 3, g.min_size, g.min_size))
            g._check = lambda x, name: None  # type: ignore[method-assign]
            with pytest.raises(RuntimeError):  # one multiple smaller: reflect padding of a 1-px map
                g(torch.zeros(1, 3, g.min_size - 8, g.min_size - 8))


def test_ihc_shape_must_match() -> None:
    with pytest.raises(ValueError, match="same shape"):
        _tiny()(_images(1, 32), ihc=_images(1, 64))


def test_norms() -> None:
    with pytest.raises(ValueError, match="instance"):
        BCIStainerGenerator(ngf=4, norm="instance")
    g = BCIStainerGenerator(ngf=4, n_style_down=2, n_blocks=1, norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert all(m.bias is not None for m in g.modules() if isinstance(m, ModulatedConv2d))
    assert g(_images(1, 32)).ihc.shape == (1, 3, 32, 32)


def test_overfits_one_pair() -> None:
    g = _tiny()
    he = _images(2, 32)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    ihc = torch.stack([0.6 * xx, 0.6 * yy, 0.5 * xx * yy])[None].expand(2, -1, -1, -1).contiguous()
    opt = torch.optim.Adam(g.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = g(he, ihc)
        assert out.aux is not None
        low = torch.nn.functional.interpolate(ihc, size=out.aux["ihc_low"].shape[-2:], mode="bilinear", align_corners=True)
        loss = (out.ihc - ihc).abs().mean() + (out.aux["ihc_low"] - low).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_preset_builds_their_widths() -> None:
    cfg = load_config("bcistainer")
    assert "bcistainer" in list_generators()
    g = create_generator(cfg.model)
    assert isinstance(g, BCIStainerGenerator)
    assert g.style_dim == 256 and len(g.blocks) == 9 and g.n_style_down == 3 and g.size_multiple == 8
    assert all(b.attention is not None for b in g.blocks)  # type: ignore[attr-defined]
    assert sum(p.numel() for p in g.parameters()) == expected_params(32, 3, 3, 9)
    assert cfg.model.d_input == "ihc" and cfg.model.ndf == 32 and cfg.model.d_scales == 2
    assert cfg.loss.stain == 0 and cfg.loss.content * cfg.loss.mae == 10 and cfg.loss.content * cfg.loss.lowres == 10
    assert cfg.loss.focal_alpha == (0.5, 0.2, 0.2, 0.1) and cfg.loss.ssim_win == 9
    assert cfg.train.lr == 1e-3 and cfg.train.betas == (0.5, 0.9) and cfg.train.ema == 0.99


@pytest.mark.parametrize(("ngf", "n_style_down", "n_blocks"), [(4, 0, 0), (4, 2, 3), (8, 1, 1)])
def test_parameter_count(ngf: int, n_style_down: int, n_blocks: int) -> None:
    g = BCIStainerGenerator(ngf=ngf, n_style_down=n_style_down, n_blocks=n_blocks)
    assert sum(p.numel() for p in g.parameters()) == expected_params(ngf, 3, n_style_down, n_blocks)


def test_module_registers_once() -> None:
    assert bcistainer.build_bcistainer(load_config("bcistainer").model).n_down == 3
