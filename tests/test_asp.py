"""ASP (models/baselines/asp.py, losses/patchnce.py) and its preset (configs/asp.yaml)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from derestainer.core.config import load_config, replace
from derestainer.core.errors import ConfigError
from derestainer.core.presets import compose_model_config
from derestainer.losses.patchnce import (
    ASP_GP_WEIGHTS,
    adaptive_patchnce_loss,
    asp_gaussian_pyramid,
    asp_lookup,
    asp_pyramid_l1_loss,
    asp_schedule,
    asp_weights,
    patchnce_loss,
)
from derestainer.losses.terms import IHC_INPUT, TERMS, LossInputs, active_terms, needs_of
from derestainer.models.baselines import asp  # registers "asp"
from derestainer.models.baselines.asp import ASPGenerator, BlurDownsample, BlurUpsample
from derestainer.models.discriminator import build_discriminator
from derestainer.models.registry import create_generator


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models only lose from more, worst of all on a shared machine."""
    saved = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
    torch.use_deterministic_algorithms(det)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _unit(n: int, p: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, p, d, generator=g, dtype=torch.float64), dim=-1)


def _tiny(n_blocks: int = 6, **kw: object) -> ASPGenerator:
    torch.manual_seed(0)
    return ASPGenerator(ngf=4, n_blocks=n_blocks, mlp_width=16, **kw)  # type: ignore[arg-type]


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _brute_nce(q: torch.Tensor, k: torch.Tensor, tau: float, all_negatives: bool) -> list[float]:
    """Per query patch, −log softmax([positive, negatives]/τ)₀ with Python loops; the query's own key
    among the negatives has the logit −10 (theirs)."""
    n, p, _ = q.shape
    out = []
    for b in range(n):
        for i in range(p):
            pos = _dot(q[b, i], k[b, i])
            keys = [(b2, j) for b2 in (range(n) if all_negatives else [b]) for j in range(p)]
            negs = [-10.0 if (b2, j) == (b, i) else _dot(q[b, i], k[b2, j]) for b2, j in keys]
            logits = [pos / tau] + [v / tau for v in negs]
            m = max(logits)
            out.append(-(logits[0] - m - math.log(sum(math.exp(v - m) for v in logits))))
    return out


# ------------------------------------------------------------------------------------- the losses
@pytest.mark.parametrize("all_negatives", [False, True])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_patchnce_matches_a_per_patch_loop(all_negatives: bool, tau: float) -> None:
    q, k = _unit(2, 5, 4, 0), _unit(2, 5, 4, 1)
    got = patchnce_loss(q, k, tau, all_negatives)
    assert got.shape == (10,)
    assert torch.allclose(got, torch.tensor(_brute_nce(q, k, tau, all_negatives), dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_minibatch_negatives_change_the_loss_only_with_several_images() -> None:
    q, k = _unit(2, 4, 3, 2), _unit(2, 4, 3, 3)
    assert not torch.allclose(patchnce_loss(q, k, 0.5, False), patchnce_loss(q, k, 0.5, True))
    assert torch.allclose(patchnce_loss(q[:1], k[:1], 0.5, False), patchnce_loss(q[:1], k[:1], 0.5, True))


def test_patchnce_keys_get_no_gradient() -> None:
    q, k = _unit(1, 4, 3, 4).requires_grad_(), _unit(1, 4, 3, 5).requires_grad_()
    patchnce_loss(q, k, 0.1).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


@pytest.mark.parametrize("t", [0.0, 0.5, 0.74, 0.75, 0.8, 0.975, 1.0])
def test_lambda_schedule_closed_form(t: float) -> None:
    # theirs: k = 1 − n_epochs_decay/total, m = 1/(1 − k), p = m − m·t for t ≥ k, else 1
    k = 1 - 10 / 40
    m = 1 / (1 - k)
    assert asp_schedule(t, "lambda", 0.75) == pytest.approx(m - m * t if t >= k else 1.0)
    assert asp_schedule(t, "linear") == pytest.approx(1 - t)
    assert asp_schedule(t, "sigmoid") == pytest.approx(1 / (1 + math.exp((t - 0.5) * 10)))
    assert asp_schedule(t, "zero") == 1.0


def test_their_last_epoch_weight() -> None:
    # their t = (epoch − 1)/40: epoch 31 still uniform, epoch 40 p = 0.1
    assert asp_schedule(30 / 40, "lambda", 0.75) == pytest.approx(1.0)
    assert asp_schedule(39 / 40, "lambda", 0.75) == pytest.approx(0.1)


def test_lookups_closed_form() -> None:
    c = torch.tensor([-0.5, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(asp_lookup(c, "linear"), torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    top = [math.sqrt(1 - (max(v, 0.0) - 1) ** 2) for v in c.tolist()]
    assert torch.allclose(asp_lookup(c, "top"), torch.tensor(top, dtype=torch.float64))
    bell = [math.exp(-((v - 0.5) * 4) ** 2 / 2) / math.sqrt(2 * math.pi) for v in c.tolist()]
    assert torch.allclose(asp_lookup(c, "bell"), torch.tensor(bell, dtype=torch.float64))
    assert torch.equal(asp_lookup(c, "uniform"), torch.ones_like(c))


@pytest.mark.parametrize("t", [0.3, 0.8, 0.95])
def test_adaptive_patchnce_closed_form(t: float) -> None:
    q, k = _unit(2, 6, 4, 6), _unit(2, 6, 4, 7)
    base = _brute_nce(q, k, 0.07, False)
    cos = [_dot(q[b, i], k[b, i]) for b in range(2) for i in range(6)]
    p = 1.0 if t < 0.75 else (1 - t) / 0.25
    w = [p + (1 - p) * max(c, 0.0) for c in cos]
    w = [v / sum(w) * len(w) for v in w]
    want = torch.tensor([lv * wv for lv, wv in zip(base, w)], dtype=torch.float64)
    got = adaptive_patchnce_loss(q, k, t, 0.07, "lambda_linear", 0.75)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    assert torch.allclose(adaptive_patchnce_loss(q, k, t, 0.07, "none"), torch.tensor(base, dtype=torch.float64))


def test_asp_weights_mean_one_and_safe() -> None:
    c = torch.tensor([0.2, 0.9, -0.3])
    assert asp_weights(c, 0.4).mean() == pytest.approx(1.0)
    assert torch.equal(asp_weights(torch.tensor([-1.0, -0.5]), 0.0), torch.zeros(2))  # theirs: 0/0


def test_bad_asp_mode() -> None:
    q = _unit(1, 3, 2, 8)
    for mode in ("lambda", "cosine_linear", "lambda_top_x"):
        with pytest.raises(ValueError, match="asp_mode"):
            adaptive_patchnce_loss(q, q, 0.5, mode=mode)


# ------------------------------------------------------------------------------- the pyramid L1
def test_asp_pyramid_construction() -> None:
    x = _images(1, 64, 3).double()
    pyr = asp_gaussian_pyramid(x)
    assert [t.shape[-1] for t in pyr] == [64, 32, 16, 8, 4, 2]
    a = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    k5 = (torch.outer(a, a) / 256).expand(3, 1, 5, 5)
    blur = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k5, groups=3)
    assert torch.allclose(pyr[0], blur)  # level 0 is blurred (unlike PyramidPix2Pix's)
    nxt = F.conv2d(F.pad(blur[..., ::2, ::2], (2, 2, 2, 2), mode="reflect"), k5, groups=3)
    assert torch.allclose(pyr[1], nxt)
    assert torch.allclose(pyr[-1], asp_gaussian_pyramid(x)[-2][..., ::2, ::2])
    flat = torch.full((1, 3, 64, 64), 0.3, dtype=torch.float64)
    assert all(torch.allclose(t, torch.full_like(t, 0.3)) for t in asp_gaussian_pyramid(flat))
    with pytest.raises(ValueError, match="px a side"):
        asp_gaussian_pyramid(_images(1, 32))


def test_asp_pyramid_loss_weights() -> None:
    a, b = _images(2, 64, 4).double(), _images(2, 64, 5).double()
    pa, pb = asp_gaussian_pyramid(a), asp_gaussian_pyramid(b)
    want = sum(w * (x - y).abs().mean() for w, x, y in zip(ASP_GP_WEIGHTS, pa, pb)) / 6
    assert asp_pyramid_l1_loss(a, b).item() == pytest.approx(want.item())
    assert asp_pyramid_l1_loss(a, a).item() == 0.0


# -------------------------------------------------------------------------------- the generator
def test_blur_sampling() -> None:
    x = torch.full((1, 2, 8, 8), 0.7)
    assert torch.allclose(BlurDownsample(2)(x), torch.full((1, 2, 4, 4), 0.7))
    assert torch.allclose(BlurUpsample(2)(x), torch.full((1, 2, 16, 16), 0.7))
    y = _images(1, 8)[:, :2]
    assert BlurDownsample(2)(y).shape == (1, 2, 4, 4) and BlurUpsample(2)(y).shape == (1, 2, 16, 16)


@pytest.mark.parametrize("size", [32, 64])
def test_feature_shapes(size: int) -> None:
    g = _tiny().train()
    he, ihc = _images(2, size, 0), _images(2, size, 1)
    feats = g.encode(he)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (3, size + 6, size + 6), (8, size, size), (16, size // 2, size // 2), (16, size // 4, size // 4),
        (16, size // 4, size // 4)]
    out = g(he, ihc)
    assert out.ihc.shape == (2, 3, size, size) and out.aux is not None
    n = [min(256, f.shape[-1] * f.shape[-2]) for f in feats]
    for key in ("nce_q", "nce_k", "nce_sup_q", "nce_sup_k"):
        assert [tuple(t.shape) for t in out.aux[key]] == [(2, m, 16) for m in n]
        assert all(t.norm(dim=-1).max() <= 1 + 1e-5 for t in out.aux[key])
    for key in ("nce_k", "nce_sup_k"):  # unit vectors (a query can be 0 where every hidden ReLU is off)
        assert all(torch.allclose(t.norm(dim=-1), torch.ones(())) for t in out.aux[key])
    assert not any(t.requires_grad for t in out.aux["nce_k"] + out.aux["nce_sup_k"])
    assert all(len(set(i.tolist())) == len(i) for i in out.aux["nce_ids"])


def test_inference_returns_the_image_only() -> None:
    g = _tiny().eval()
    out = g(_images(1, 32))
    assert out.aux is None and out.ihc.shape == (1, 3, 32, 32)
    assert out.ihc.abs().max() <= 1


def test_q_and_k_use_the_same_patch_ids() -> None:
    g = _tiny().train()
    he, ihc = _images(2, 32, 0), _images(2, 32, 1)
    torch.manual_seed(3)
    out = g(he, ihc)
    assert out.aux is not None
    aux = out.aux
    with torch.no_grad():  # train-mode BN: the same batch gives the same statistics
        for q_key, k_key, ids_key, src in (("nce_q", "nce_k", "nce_ids", he), ("nce_sup_q", "nce_sup_k", "nce_sup_ids", ihc)):
            ids = aux[ids_key]
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g.project(g.encode(out.ihc), ids), aux[q_key]))
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g.project(g.encode(src), ids), aux[k_key]))
    # the two terms draw their positions separately, from the seeded global RNG
    assert any(not torch.equal(a, b) for a, b in zip(aux["nce_ids"], aux["nce_sup_ids"]))
    torch.manual_seed(3)
    again = g(he, ihc).aux
    assert again is not None and all(torch.equal(a, b) for a, b in zip(aux["nce_ids"], again["nce_ids"]))


def test_patch_generator() -> None:
    g = _tiny().train()
    he, ihc = _images(1, 32, 0), _images(1, 32, 1)
    ids = []
    for _ in range(2):
        g.patch_generator = torch.Generator().manual_seed(5)
        torch.manual_seed(len(ids))  # the global RNG differs, the positions do not
        aux = g(he, ihc).aux
        assert aux is not None
        ids.append(aux["nce_ids"])
    assert all(torch.equal(a, b) for a, b in zip(*ids))


def test_extra_encoder_passes_leave_running_stats_alone() -> None:
    g = _tiny().train()
    ref = copy.deepcopy(g)
    he, ihc = _images(2, 32, 0), _images(2, 32, 1)
    g(he, ihc)
    ref(he)
    for (name, a), b in zip(g.named_buffers(), ref.buffers()):
        if a.is_floating_point():
            assert torch.allclose(a, b), name
    momenta = {m.momentum for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.1}


def test_terms_finite_and_gradients_reach_generator_and_heads() -> None:
    g = _tiny().train()
    he, ihc = _images(2, 64, 0), _images(2, 64, 1)
    cfg = load_config("asp").loss
    out = g(he, ihc)
    x = LossInputs(out=out, he=he, ihc=ihc, level=None, cfg=cfg, progress=0.9)
    values = {name: TERMS[name].fn(x) for name in ("nce", "asp", "asp_gp")}
    assert all(v is not None and torch.isfinite(v) for v in values.values()), values
    total = sum(10.0 * v for v in values.values() if v is not None)
    assert isinstance(total, torch.Tensor)
    total.backward()
    stem = g.net[1].weight.grad
    assert stem is not None and stem.abs().sum() > 0
    for head in g.heads:
        grad = head[0].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    # at inference (no aux) the NCE terms have nothing to read
    y = LossInputs(out=g.eval()(he), he=he, ihc=ihc, level=None, cfg=cfg)
    assert TERMS["nce"].fn(y) is None and TERMS["asp"].fn(y) is None


def test_overfits_one_pair_with_l1_and_nce() -> None:
    torch.manual_seed(0)
    g = ASPGenerator(ngf=8, n_blocks=6, mlp_width=32).train()
    he = F.interpolate(_images(1, 4, 0), size=32, mode="nearest")
    ihc = torch.tanh(1.5 * he.flip(1) - 0.2)
    opt = torch.optim.Adam(g.parameters(), lr=2e-3, betas=(0.5, 0.999))
    l1s = []
    for _ in range(40):
        out = g(he, ihc)
        x = LossInputs(out=out, he=he, ihc=ihc, level=None, cfg=load_config("asp").loss, progress=0.0)
        nce = TERMS["nce"].fn(x)
        assert nce is not None
        l1 = (out.ihc - ihc).abs().mean()
        opt.zero_grad()
        (10 * l1 + nce).backward()
        opt.step()
        l1s.append(l1.item())
    assert np.mean(l1s[-5:]) < 0.5 * l1s[0], (l1s[0], l1s[-5:])


def test_norms_and_layers_checked() -> None:
    with pytest.raises(ValueError, match="instance"):
        ASPGenerator(ngf=4, norm="instance")
    with pytest.raises(ValueError, match="nce_layers"):
        ASPGenerator(ngf=4, n_blocks=2)  # layer 16 is the 5th block
    with pytest.raises(ValueError, match="divisible"):
        _tiny()(_images(1, 30))
    cfg = load_config("asp")
    for model in ({"norm": "instance"}, {"n_fusion_blocks": 4}):
        with pytest.raises(ConfigError):
            create_generator(replace(cfg, model=model).model)


# ------------------------------------------------------------------------------------ the preset
def test_preset_loads_and_builds() -> None:
    cfg = load_config("asp")
    mc, lc, tc = cfg.model, cfg.loss, cfg.train
    assert (mc.name, mc.ngf, mc.n_down, mc.n_fusion_blocks, mc.norm) == ("asp", 64, 2, 6, "batch")
    assert (mc.ndf, mc.d_layers, mc.d_scales, mc.d_input, mc.d_norm) == (32, 5, 1, "ihc", "instance")
    assert (lc.nce, lc.nce_tau, lc.asp, lc.asp_mode, lc.asp_gp, lc.gan, lc.gan_mode) == \
        (10.0, 0.07, 10.0, "lambda_linear", 10.0, 1.0, "lsgan")
    assert active_terms(lc) == {"gan", "nce", "asp", "asp_gp"}
    assert IHC_INPUT in needs_of(active_terms(lc))
    assert (tc.lr, tuple(tc.betas), tc.weight_decay, tc.lr_schedule, tc.lr_decay_start) == (2e-4, (0.5, 0.999), 0.0, "linear", 0.75)
    g = create_generator(mc)
    assert isinstance(g, ASPGenerator) and g.nce_layers == (0, 4, 8, 12, 16) and g.num_patches == 256
    assert [h[0].in_features for h in g.heads] == [3, 128, 256, 256, 256]
    d = build_discriminator(mc)
    assert [tuple(t.shape) for t in d(_images(1, 128), _images(1, 128))] == [(1, 1, 2, 2)]
    assert asp.build_asp is not None


def test_preset_on_tiny_trains_saves_and_loads(tmp_path: Path) -> None:
    from derestainer.models.files import load_generator
    from derestainer.training.loop import train

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(2):
            base = np.kron(rng.random((8, 8, 3)), np.ones((8, 8, 1)))
            for stain, img in (("HE", base), ("IHC", base[..., ::-1])):
                d = tmp_path / "d" / stain / split
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray((255 * (0.2 + 0.7 * img)).astype(np.uint8)).save(d / f"{i:05d}_{split}_1+.png")
    cfg = compose_model_config("asp", "tiny", ["asp:model.d_layers=2"])
    cfg = replace(cfg, data={"root": str(tmp_path / "d"), "size": 64, "val_split": "test"},
                  train={"out": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 0,
                         "sample_every": 0, "tensorboard": "off", "deterministic": True, "device": "cpu"})
    assert (cfg.model.ngf, cfg.model.n_fusion_blocks) == (8, 6)
    summary = train(cfg)
    assert summary["steps"] == 2
    g, cfg2, _ = load_generator(tmp_path / "run" / "generator.safetensors")
    assert isinstance(g, ASPGenerator) and cfg2.loss.asp == 10.0
    assert g(_images(1, 64)).aux is None
