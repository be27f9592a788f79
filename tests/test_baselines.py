"""Baselines in the same framework: pix2pix, PyramidPix2Pix, pix2pixHD; their presets and the ablation presets."""

from __future__ import annotations

import pytest
import torch

from derestainer.core.config import load_config
from derestainer.models.base import GenOutput
from derestainer.models.baselines import ResnetBlock, ResnetGenerator
from derestainer.models.registry import create_generator, list_generators

BASELINES = ("pix2pix", "pyramidpix2pix", "pix2pixhd")
TINY = ["model.ngf=8", "model.n_fusion_blocks=2", "model.ndf=8"]


@pytest.mark.parametrize("name", BASELINES)
def test_registered_and_preset_resolves(name: str) -> None:
    assert name in list_generators()
    cfg = load_config(name)
    assert cfg.model.name == name
    # The baselines have no f_level / f_H and no comparator: those terms must be off.
    assert cfg.loss.level == 0 and cfg.loss.stain == 0 and cfg.loss.content == 0
    assert cfg.loss.gan > 0 and (cfg.loss.l1 > 0 or cfg.loss.pyramid > 0 or cfg.loss.fm > 0)


def test_preset_settings_follow_the_originals() -> None:
    p2p, pyr, hd = (load_config(n) for n in BASELINES)
    # pix2pix: lambda_L1 = 100, single-scale 70x70 PatchGAN, Adam(0.5, 0.999) lr 2e-4, ResNet 2 downs / 9 blocks.
    assert (p2p.loss.l1, p2p.model.d_scales, p2p.model.d_layers) == (100.0, 1, 3)
    assert (p2p.train.lr, p2p.train.betas, p2p.train.weight_decay) == (2e-4, (0.5, 0.999), 0.0)
    assert (p2p.model.n_down, p2p.model.n_fusion_blocks, p2p.model.norm) == (2, 9, "batch")
    # PyramidPix2Pix (BCI code, pattern L1_L2_L3_L4): 25 on each of 4 levels, full resolution included.
    assert (pyr.loss.pyramid, pyr.loss.pyramid_levels, pyr.loss.l1) == (25.0, 4, 0.0)
    # pix2pixHD: global generator (4 downs), a 2-scale instance-norm discriminator, LSGAN, lambda_feat 10 on
    # feature matching and on VGG (that one only with local weights), no L1.
    assert (hd.model.n_down, hd.model.d_scales, hd.model.d_norm, hd.loss.gan_mode) == (4, 2, "instance", "lsgan")
    assert (hd.loss.fm, hd.loss.vgg, hd.loss.vgg_weights, hd.loss.l1) == (10.0, 10.0, "", 0.0)


@pytest.mark.parametrize("preset,field,value", [("no_stain", "stain", 0.0), ("no_dab", "dab", 0.0)])
def test_ablation_presets(preset: str, field: str, value: float) -> None:
    cfg = load_config(preset)
    assert cfg.model.name == "derestainer"
    assert getattr(cfg.loss, field) == value


def test_rgb_encoder_preset() -> None:
    cfg = load_config("rgb_encoder")
    paper = load_config("paper")
    assert cfg.model.encoder_input == "rgb"
    assert cfg.model.name == "derestainer"
    assert cfg.loss == paper.loss and cfg.train == paper.train


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("size", [32, 64])
def test_forward_backward_with_discriminator_and_losses(name: str, size: int) -> None:
    from derestainer.losses import GeneratorLoss, lsgan_d_loss
    from derestainer.models.discriminator import build_discriminator

    torch.manual_seed(0)
    cfg = load_config(name, TINY + ["model.d_layers=2"])
    gen = create_generator(cfg.model)
    disc = build_discriminator(cfg.model)
    assert len(disc.discriminators) == cfg.model.d_scales
    he = torch.rand(2, 3, size, size) * 2 - 1
    ihc = torch.rand(2, 3, size, size) * 2 - 1
    out = gen(he, ihc)
    assert isinstance(out, GenOutput)
    assert out.ihc.shape == he.shape and out.level_logits is None and out.h_embed_he is None
    assert out.ihc.abs().max() <= 1.0
    loss_fn = GeneratorLoss(cfg.loss)
    total, terms = loss_fn(out, he, ihc, level=torch.tensor([0, 3]), d_fake_outputs=disc(he, out.ihc))
    assert torch.isfinite(total)
    expected = {"pix2pix": {"gan", "l1"}, "pyramidpix2pix": {"gan", "pyramid"}, "pix2pixhd": {"gan"}}[name]
    assert set(terms) - {"total"} == expected  # pix2pixHD's fm needs D's features, its VGG term weights
    if name == "pix2pixhd":
        fake_f, real_f = disc(he, out.ihc, features=True), disc(he, ihc, features=True)
        total, terms = loss_fn(out, he, ihc, d_fake_outputs=[f[-1] for f in fake_f],
                               d_fake_feats=[f[:-1] for f in fake_f], d_real_feats=[f[:-1] for f in real_f])
        assert set(terms) - {"total"} == {"gan", "fm"} and cfg.loss.fm == 10.0 and cfg.loss.l1 == 0.0
    total.backward()
    for pname, p in gen.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    d_loss = lsgan_d_loss(disc(he, ihc), disc(he, out.ihc.detach()))
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_pix2pixhd_overfits_one_batch_by_feature_matching() -> None:
    # G alone against a fixed discriminator: matching D's features of the real pair pulls G's output to it.
    import torch.nn.functional as F

    from derestainer.losses import GeneratorLoss, mae_loss
    from derestainer.models.discriminator import build_discriminator

    torch.manual_seed(0)
    cfg = load_config("pix2pixhd", TINY + ["model.d_layers=2", "loss.gan=0"])
    gen, disc = create_generator(cfg.model), build_discriminator(cfg.model).eval()
    for p in disc.parameters():
        p.requires_grad_(False)
    he = F.avg_pool2d(torch.rand(2, 3, 32, 32) * 2 - 1, 5, 1, 2)
    ihc = F.avg_pool2d(torch.rand(2, 3, 32, 32) * 2 - 1, 5, 1, 2)
    real = [[t.detach() for t in f[:-1]] for f in disc(he, ihc, features=True)]
    loss_fn, opt = GeneratorLoss(cfg.loss), torch.optim.Adam(gen.parameters(), 2e-3)
    fm, l1 = [], []
    for _ in range(60):
        out = gen(he)
        total, terms = loss_fn(out, he, ihc, d_fake_feats=[f[:-1] for f in disc(he, out.ihc, features=True)],
                               d_real_feats=real)
        opt.zero_grad()
        total.backward()
        opt.step()
        fm.append(float(terms["fm"]))
        l1.append(float(mae_loss(out.ihc, ihc).detach()))
    assert fm[-1] < 0.25 * fm[0] and l1[-1] < 0.7 * l1[0], (fm[0], fm[-1], l1[0], l1[-1])


def test_resnet_generator_matches_cyclegan_size() -> None:
    # pytorch-CycleGAN-and-pix2pix prints "[Network G] Total number of parameters : 11.378 M" for
    # resnet_9blocks with its default instance norm (convolutions with bias, norm without affine).
    g = ResnetGenerator(ngf=64, n_down=2, n_blocks=9, norm="instance")
    n = sum(p.numel() for p in g.parameters())
    assert round(n / 1e6, 3) == 11.378
    # With batch norm the convolution biases go (cancelled by the norm) and affine norm parameters come.
    gb = ResnetGenerator(ngf=64, n_down=2, n_blocks=9, norm="batch")
    conv_bias = sum(m.bias.numel() for m in g.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)))
    bn_affine = sum(2 * m.num_features for m in gb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sum(p.numel() for p in gb.parameters()) == n - conv_bias + 3 + bn_affine  # the last conv keeps its bias


def test_resnet_generator_layout() -> None:
    g = ResnetGenerator(ngf=8, n_down=3, n_blocks=4, norm="none")
    blocks = [m for m in g.modules() if isinstance(m, ResnetBlock)]
    assert len(blocks) == 4
    assert blocks[0].body[1].in_channels == 8 * 2**3
    assert isinstance(g.net[0], torch.nn.ReflectionPad2d) and g.net[1].kernel_size == (7, 7)
    assert isinstance(g.net[-1], torch.nn.Tanh)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)) for m in g.modules())


def test_residual_block_is_identity_when_body_is_zero() -> None:
    blk = ResnetBlock(4, norm="none")
    for p in blk.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(blk(x), x)


def test_eval_mode_is_deterministic_and_tile_independent() -> None:
    # Batch norm in eval mode and no dropout at inference: a sample's output does not depend on its batch.
    torch.manual_seed(0)
    g = create_generator(load_config("pix2pix", TINY).model)
    g.train()
    for _ in range(2):  # move the running statistics away from their initial values
        g(torch.rand(2, 3, 32, 32) * 2 - 1)
    g.eval()
    a = torch.rand(1, 3, 32, 32) * 2 - 1
    b = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        alone = g(a).ihc
        batched = g(torch.cat([a, b])).ihc[:1]
        again = g(a).ihc
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-6)
    assert torch.equal(alone, again)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="norm"):
        ResnetGenerator(norm="layer")
    g = ResnetGenerator(ngf=4, n_down=2, n_blocks=1)
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.zeros(1, 3, 30, 32))


def test_save_load_roundtrip(tmp_path) -> None:
    from derestainer.models.files import load_generator, save_generator

    torch.manual_seed(0)
    cfg = load_config("pyramidpix2pix", TINY)
    g = create_generator(cfg.model).eval()
    p = save_generator(tmp_path / "g.safetensors", g, cfg)
    g2, cfg2, meta = load_generator(p)
    assert meta["model"] == "pyramidpix2pix" and cfg2 == cfg
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(g(x).ihc, g2(x).ihc)
