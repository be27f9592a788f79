"""The fast inference path gives the eager model's outputs, step by step, within stated tolerances.

Tolerances: fp32 rewrites (BatchNorm folding, channels_last, unfused/auto modulated convolutions,
in-place activations) 1e-5 relative to the output's scale; bf16 autocast 5e-2 of the output's
spread (relative RMS error). Models are built at tiny widths with non-trivial BatchNorm statistics
and modulation styles, so that every rewrite has something to get wrong.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from derestainer.core.config import load_config
from derestainer.inference import precision as opt_mod
from derestainer.inference.optimize import (
    EAGER,
    FastPathOptions,
    count_batchnorm,
    eager_model,
    fold_batchnorm,
    inplace_activations,
    optimize_for_inference,
)
from derestainer.inference.precision import default_precision, native_cpu_bf16
from derestainer.layers.modulated_conv import (
    ModulatedConv2d,
    demodulation_coefficients,
    modulated_conv2d,
    prefer_fused,
)
from derestainer.models.registry import create_generator

MODELS = ("tiny", "pix2pix", "pyramidpix2pix")


def _model(preset: str, seed: int = 0) -> nn.Module:
    """A tiny generator in eval mode with BatchNorm statistics and modulation as after training."""
    torch.manual_seed(seed)
    over = [] if preset == "tiny" else ["model.ngf=8", "model.n_fusion_blocks=2"]
    m = create_generator(load_config(preset, over).model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 2 + 0.2)
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.num_features, generator=g))
            if isinstance(mod, ModulatedConv2d):
                mod.affine.weight.copy_(torch.randn(mod.affine.weight.shape, generator=g))
    return m.eval()


def _images(n: int, size: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {p: _model(p) for p in MODELS}


# ------------------------------------------------------------------------------ BatchNorm folding
@pytest.mark.parametrize("preset", MODELS)
def test_folded_batchnorm_equals_unfolded_model(models: dict[str, nn.Module], preset: str) -> None:
    m = models[preset]
    x = _images(2, 64)
    with torch.no_grad():
        ref = m(x)
        folded = copy.deepcopy(m)
        n = fold_batchnorm(folded)
        out = folded(x)
    assert n == count_batchnorm(m) > 0 and count_batchnorm(folded) == 0
    _close(out.ihc, ref.ihc, 1e-5)
    if ref.level_logits is not None:
        _close(out.level_logits, ref.level_logits, 1e-5)
        _close(out.h_embed_he, ref.h_embed_he, 1e-5)
    assert count_batchnorm(m) == n  # the original is untouched


def test_fold_handles_transposed_convolutions_and_checks_by_hand() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, bias=False),
                        nn.BatchNorm2d(6), nn.ReLU())
    bn = seq[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    seq.eval()
    x = torch.randn(2, 4, 5, 5)
    # BatchNorm written out: (y − μ)/√(σ²+ε)·γ + β
    y = F.conv_transpose2d(x, seq[0].weight, stride=2, padding=1, output_padding=1)
    ref = torch.relu((y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                     * bn.weight[:, None, None] + bn.bias[:, None, None])
    assert fold_batchnorm(seq) == 1
    assert isinstance(seq[0], nn.ConvTranspose2d) and isinstance(seq[1], nn.Identity)
    with torch.no_grad():
        _close(seq(x), ref, 1e-5)


def test_fold_leaves_training_mode_batchnorm_alone() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seq.train()
    assert fold_batchnorm(seq) == 0 and isinstance(seq[1], nn.BatchNorm2d)


def test_inplace_activations_only_after_a_fresh_tensor() -> None:
    residual_first = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv2d(3, 3, 1))  # input of the Sequential: not safe
    after_conv = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Identity(), nn.LeakyReLU(0.2))
    assert inplace_activations(residual_first) == 0 and not residual_first[0].inplace
    assert inplace_activations(after_conv) == 1 and after_conv[2].inplace
    x = torch.randn(1, 3, 4, 4)
    before = x.clone()
    with torch.no_grad():
        residual_first(x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------ modulated conv
@pytest.mark.parametrize("n", [1, 3])
def test_auto_modconv_equals_both_forms(n: int) -> None:
    torch.manual_seed(0)
    x, w, s = torch.randn(n, 6, 9, 9), torch.randn(5, 6, 3, 3), torch.randn(n, 6)
    kw = {"padding": 1, "padding_mode": "reflect"}
    auto = modulated_conv2d(x, w, s, fused="auto", **kw)
    fused = modulated_conv2d(x, w, s, fused=True, **kw)
    unfused = modulated_conv2d(x, w, s, fused=False, **kw)
    _close(auto, fused, 1e-5)
    _close(auto, unfused, 1e-5)
    layer = ModulatedConv2d(6, 5, 3, style_dim=4, fused="auto")
    with torch.no_grad():
        layer.affine.weight.normal_()
    st = torch.softmax(torch.randn(n, 4), 1)
    y_auto = layer(x, st)
    layer.fused = True
    _close(y_auto, layer(x, st), 1e-5)
    layer.fused = False
    _close(y_auto, layer(x, st), 1e-5)


def test_auto_modconv_rule() -> None:
    # deterministic: by device type and batch size only (meta tensors stand in for an accelerator)
    assert prefer_fused(torch.zeros(1, 2, 3, 3)) is False
    assert prefer_fused(torch.zeros(4, 2, 3, 3)) is False
    assert prefer_fused(torch.empty(1, 2, 3, 3, device="meta")) is True
    assert prefer_fused(torch.empty(2, 2, 3, 3, device="meta")) is False
    with pytest.raises(ValueError, match="fused"):
        modulated_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(2, 2, 1, 1), torch.zeros(1, 2), fused="fastest")
    with pytest.raises(ValueError, match="fused"):
        ModulatedConv2d(2, 2, 3, fused="yes")


def test_demodulation_stays_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = ModulatedConv2d(8, 8, 3, style_dim=4, fused=False)
    st = torch.softmax(torch.randn(2, 4), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = layer.affine(st)
        d = demodulation_coefficients(layer.weight, s)
    assert d.dtype == torch.float32
    w = layer.weight[None] * (s.float() + 1)[:, None, :, None, None]
    torch.testing.assert_close(d, w.square().sum((2, 3, 4)).add(1e-8).rsqrt(), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ the whole path
@pytest.mark.parametrize("preset", MODELS)
def test_channels_last_alone_equals_eager(models: dict[str, nn.Module], preset: str) -> None:
    m = models[preset]
    x = _images(2, 64)
    ref = eager_model(m)(x)
    only_cl = FastPathOptions(**{**EAGER.to_dict(), "channels_last": True})
    fast = optimize_for_inference(m, "cpu", only_cl)
    convs = [p for p in fast.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    _close(fast(x).ihc, ref.ihc, 1e-5)


@pytest.mark.parametrize("preset", MODELS)
def test_fp32_fast_path_equals_eager(models: dict[str, nn.Module], preset: str) -> None:
    m = models[preset]
    x = _images(3, 64)
    ref = eager_model(m)(x)
    fast = optimize_for_inference(m, "cpu", precision="fp32")
    out = fast(x)
    assert fast.precision == "fp32" and count_batchnorm(fast.model) == 0
    assert out.ihc.dtype == torch.float32 and out.ihc.is_contiguous()
    _close(out.ihc, ref.ihc, 1e-5)
    if ref.level_logits is not None:
        _close(out.level_logits, ref.level_logits, 1e-5)
        assert out.h_embed_he is None and fast.report["skipped"] == ["f_h"]  # f_H is not run
        assert all(mc.fused == "auto" for mc in fast.model.modules() if isinstance(mc, ModulatedConv2d))
        with pytest.raises(ValueError, match="ihc"):
            fast(x, x)
    else:  # nothing skipped: ihc is accepted (and ignored, as by the model itself)
        _close(fast(x, x).ihc, ref.ihc, 1e-5)
    # the original model is not modified
    assert count_batchnorm(m) > 0


def test_each_switch_alone_keeps_outputs(models: dict[str, nn.Module]) -> None:
    m = models["tiny"]
    x = _images(2, 64)
    ref = eager_model(m)(x).ihc
    for field in ("fold_bn", "inference_mode", "inplace", "skip_unused"):
        opts = FastPathOptions(**{**EAGER.to_dict(), field: True})
        _close(optimize_for_inference(m, "cpu", opts)(x).ihc, ref, 1e-5)
    for mode in ("fused", "unfused", "auto"):
        opts = FastPathOptions(**{**EAGER.to_dict(), "modconv": mode})
        _close(optimize_for_inference(m, "cpu", opts)(x).ihc, ref, 1e-5)


@pytest.mark.parametrize("preset", ["tiny", "pix2pix"])
def test_bf16_fast_path_is_close(models: dict[str, nn.Module], preset: str) -> None:
    m = models[preset]
    x = _images(2, 64)
    ref = eager_model(m)(x).ihc
    fast = optimize_for_inference(m, "cpu", precision="bf16")
    out = fast(x).ihc
    assert out.dtype == torch.float32
    rel = ((out - ref).square().mean().sqrt() / ref.std()).item()
    assert rel < 5e-2, rel
    if preset == "tiny":  # the stain separation runs in fp32 inside the bf16 model
        assert "fp32_islands" not in fast.report  # no wrapper needed: the module is fp32 by itself
        island = fast.model.destainer.separation
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert island(x, "h").dtype == torch.float32


def test_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_precision("cuda") == "bf16"
    monkeypatch.setattr(opt_mod, "native_cpu_bf16", lambda: False)
    assert default_precision("cpu") == "fp32"
    monkeypatch.setattr(opt_mod, "native_cpu_bf16", lambda: True)
    assert default_precision("cpu") == ("bf16" if opt_mod.CPU_AUTO_BF16 else "fp32")
    assert isinstance(native_cpu_bf16(), bool)
    with pytest.raises(ValueError, match="precision"):
        FastPathOptions(precision="fp16")


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("preset", MODELS)
def test_fast_path_on_cuda(models: dict[str, nn.Module], preset: str) -> None:
    m = models[preset]
    x = _images(4, 64).cuda()
    ref = eager_model(m, "cuda")(x).ihc
    fp32 = optimize_for_inference(m, "cuda", precision="fp32")(x).ihc
    # cuDNN may use TF32 for fp32 convolutions on either path: 1e-2 relative to the output's scale
    _close(fp32, ref, 1e-2)
    fast = optimize_for_inference(m, "cuda")
    assert fast.precision == "bf16"
    out = fast(x).ihc
    assert ((out - ref).square().mean().sqrt() / ref.std()).item() < 5e-2


@pytest.mark.gpu
def test_modconv_forms_agree_on_cuda() -> None:
    torch.manual_seed(0)
    for n in (1, 4):
        x, w, s = torch.randn(n, 16, 12, 12).cuda(), torch.randn(16, 16, 3, 3).cuda(), torch.randn(n, 16).cuda()
        torch.backends.cudnn.allow_tf32 = False
        try:
            a = modulated_conv2d(x, w, s, padding=1, fused="auto")
            _close(a, modulated_conv2d(x, w, s, padding=1, fused=True), 1e-5)
            _close(a, modulated_conv2d(x, w, s, padding=1, fused=False), 1e-5)
        finally:
            torch.backends.cudnn.allow_tf32 = True
        assert prefer_fused(x) is (n == 1)


@pytest.mark.gpu
def test_torch_compile_fast_path_on_cuda(models: dict[str, nn.Module]) -> None:
    # compile takes about a minute on this project's 2-core CPU, so it is exercised on CUDA only
    m = models["tiny"]
    x = _images(2, 64).cuda()
    ref = optimize_for_inference(m, "cuda", precision="fp32")(x).ihc
    out = optimize_for_inference(m, "cuda", precision="fp32", compile=True)(x).ihc
    _close(out, ref, 1e-2)
