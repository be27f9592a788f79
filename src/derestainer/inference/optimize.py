"""The fast inference path: the same generator, rewritten for speed, with the same outputs.

:func:`optimize_for_inference` returns an :class:`InferenceModel` (``forward(he, ihc=None) ->
GenOutput``, like every generator) built from a *copy* of the model, with each step switchable:

============================  =========================================================  ==============================
step                          what it does                                               outputs vs. the eager model
============================  =========================================================  ==============================
``fold_bn``                   eval-mode BatchNorm folded into the convolution before it   fp32 rounding (≤ 1e-5 relative)
                              (:func:`fold_batchnorm`, conv→BN and transposed conv→BN)
``channels_last``             weights and input in NHWC, which oneDNN and cuDNN prefer    fp32 rounding
``inference_mode``            ``torch.inference_mode`` (no autograd bookkeeping)          identical
``inplace``                   activations after a conv/BN run in place                    identical
``modconv``                   modulated convolutions ``fused``/``unfused``/``auto``       fp32 rounding
                              (:func:`~derestainer.layers.modulated_conv.prefer_fused`)
``skip_unused``               heads only the training losses need (DeReStainer's f_H)      ``h_embed_he`` is None
                              are not run
``precision``                 ``fp32`` | ``bf16`` autocast | ``auto``                     bf16: ~1e-2 (model space)
                              (:mod:`.precision`: bf16 on CUDA and on CPUs with
                              native bf16, else fp32); the stain separation computes
                              in fp32 by itself (models.destainer.StainSeparation)
``compile``                   ``torch.compile`` of the whole forward (off by default)     fp32 rounding
============================  =========================================================  ==============================

Measured speed-ups and the commands that produced them: docs/performance.md.

The copy is for inference only: its BatchNorm layers are gone and DeReStainer's f_H is replaced,
so do not train or export it; keep the original model for that.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from derestainer.inference.precision import Precision, bf16_autocast, check_precision, fast_precision
from derestainer.layers.modulated_conv import ModulatedConv2d
from derestainer.models.base import GenOutput

#: How modulated convolutions run (:func:`set_modconv_mode`).
ModconvMode = Literal["auto", "fused", "unfused", "keep"]
MODCONV_MODES: tuple[str, ...] = get_args(ModconvMode)


@dataclass(frozen=True)
class FastPathOptions:
    """Which steps of the fast path to apply (see the module docstring for each)."""

    fold_bn: bool = True
    channels_last: bool = True
    inference_mode: bool = True
    inplace: bool = True
    modconv: ModconvMode = "auto"
    skip_unused: bool = True
    precision: Precision = "auto"
    compile: bool = False
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.modconv not in MODCONV_MODES:
            raise ValueError(f"modconv must be one of {MODCONV_MODES}, got {self.modconv!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Every step off: the plain eager fp32 model (what ``--compare`` measures the fast path against).
EAGER = FastPathOptions(fold_bn=False, channels_last=False, inference_mode=False, inplace=False,
                        modconv="fused", skip_unused=False, precision="fp32", compile=False)


# --------------------------------------------------------------------------------------------------
# Graph rewrites (in place, on an eval-mode module)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats:
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    if isinstance(conv, nn.Conv2d):
        return conv.out_channels == bn.num_features
    if isinstance(conv, nn.ConvTranspose2d):
        return conv.out_channels == bn.num_features
    return False


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` into the convolution right before it, in place.

    Looks inside every ``nn.Sequential`` for a ``Conv2d`` or ``ConvTranspose2d`` immediately followed
    by a ``BatchNorm2d`` (the layout of every conv-norm-act block of DeReStainer, the pix2pix ResNet
    generator and the PatchGAN), replaces the convolution by one with
    ``W' = W·γ/√(σ²+ε)``, ``b' = (b − μ)·γ/√(σ²+ε) + β`` (``torch.nn.utils.fusion.fuse_conv_bn_eval``)
    and the BatchNorm by ``nn.Identity``. Only valid for inference with running statistics.

    Args:
        module: a model in eval mode (BatchNorm layers in training mode are left alone).
    Returns:
        The number of folded conv→BN pairs.
    """
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = seq._modules[a], seq._modules[b]
            if conv is None or bn is None or not _foldable(conv, bn):
                continue
            assert isinstance(bn, nn.BatchNorm2d)  # both checked by _foldable
            fused: nn.Module
            if isinstance(conv, nn.ConvTranspose2d):
                fused = fuse_conv_bn_eval(conv, bn, transpose=True)
            else:
                assert isinstance(conv, nn.Conv2d)
                fused = fuse_conv_bn_eval(conv, bn)
            seq._modules[a] = fused
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded


def count_batchnorm(module: nn.Module) -> int:
    """Number of BatchNorm layers left in ``module``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


_ACTS = (nn.ReLU, nn.LeakyReLU)
_FRESH = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)


def inplace_activations(module: nn.Module) -> int:
    """Make ReLU/LeakyReLU run in place where its input is a fresh tensor nobody else reads.

    Only activations that follow a convolution or BatchNorm inside an ``nn.Sequential``, possibly
    through ``nn.Identity`` layers (a folded BatchNorm, a ``norm='none'``): their input is an
    intermediate of that Sequential, never a residual or the Sequential's own input. Saves one
    full-size allocation and memory pass each. Returns how many were switched.
    """
    n = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        mods = list(seq._modules.values())
        for i, act in enumerate(mods):
            if not isinstance(act, _ACTS) or act.inplace:
                continue
            j = i - 1
            while j >= 0 and isinstance(mods[j], nn.Identity):
                j -= 1
            if j >= 0 and isinstance(mods[j], _FRESH):
                act.inplace = True
                n += 1
    return n


def set_modconv_mode(module: nn.Module, mode: ModconvMode) -> int:
    """Set every :class:`ModulatedConv2d` to ``fused`` / ``unfused`` / ``auto`` (``keep``: no change)."""
    if mode not in MODCONV_MODES:
        raise ValueError(f"modconv must be one of {MODCONV_MODES}, got {mode!r}")
    if mode == "keep":
        return 0
    value: bool | Literal["auto"] = "auto" if mode == "auto" else mode == "fused"
    n = 0
    for m in module.modules():
        if isinstance(m, ModulatedConv2d):
            m.fused = value
            n += 1
    return n


class _Skipped(nn.Module):
    """Stands in for a head whose output inference does not use; returns None."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        return None


def skip_training_heads(model: nn.Module) -> list[str]:
    """Replace heads that only feed training losses by a no-op (DeReStainer's f_H, used by ``L_H``).

    Returns the names of the replaced attributes. The model's ``forward(he)`` then returns
    ``GenOutput`` with ``h_embed_he=None``; it must not be called with ``ihc`` any more.
    """
    replaced = []
    if isinstance(getattr(model, "f_h", None), nn.Module):
        model.f_h = _Skipped()
        replaced.append("f_h")
    return replaced


# --------------------------------------------------------------------------------------------------
# The optimised model


class InferenceModel(nn.Module):
    """A generator prepared for inference by :func:`optimize_for_inference`.

    ``forward(he [N, 3, H, W] in [-1, 1], ihc=None) -> GenOutput`` with ``ihc`` float32 NCHW
    (whatever precision ran inside) and ``level_logits`` float32 (or None). Runs under
    ``torch.inference_mode`` and the chosen autocast by itself; the input is converted to
    channels_last when that step is on.

    Attributes:
        model: the rewritten copy. options: the :class:`FastPathOptions` used. precision: the
        resolved precision. device. report: what each step changed (counts).
    """

    def __init__(self, model: nn.Module, options: FastPathOptions, device: torch.device, report: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.device = device
        self.precision = fast_precision(device, options.precision)
        self.report = report
        self._run = torch.compile(self._forward, dynamic=False, mode=options.compile_mode) if options.compile else self._forward

    @property
    def size_multiple(self) -> int | None:
        m = getattr(self.model, "size_multiple", None)
        return int(m) if m else None

    def _forward(self, he: torch.Tensor) -> GenOutput:
        return self.model(he)

    def _grad_mode(self) -> contextlib.AbstractContextManager[Any]:
        return torch.inference_mode() if self.options.inference_mode else torch.no_grad()

    def forward(self, he: torch.Tensor, ihc: torch.Tensor | None = None) -> GenOutput:
        if ihc is not None and self.report.get("skipped"):
            raise ValueError(f"this InferenceModel skips {', '.join(self.report['skipped'])} (skip_unused=True): "
                             "it translates H&E only; call it without ihc, or build it with skip_unused=False")
        with self._grad_mode(), bf16_autocast(he.device.type, self.precision):
            if self.options.channels_last:
                he = he.contiguous(memory_format=torch.channels_last)
            out = self._run(he) if ihc is None else self.model(he, ihc)
        fake = out.ihc.float().contiguous()
        logits = None if out.level_logits is None else out.level_logits.float()
        h_he = None if out.h_embed_he is None else out.h_embed_he.float()
        h_ihc = None if out.h_embed_ihc is None else out.h_embed_ihc.float()
        return GenOutput(ihc=fake, level_logits=logits, h_embed_he=h_he, h_embed_ihc=h_ihc)


def optimize_for_inference(
    model: nn.Module,
    device: torch.device | str | None = None,
    options: FastPathOptions | None = None,
    *,
    copy_model: bool = True,
    **overrides: Any,
) -> InferenceModel:
    """The fast inference path of ``model`` (a generator: ``forward(he, ihc=None) -> GenOutput``).

    Args:
        model: any registered generator (DeReStainer, pix2pix, ...), trained or not.
        device: where to run it (default: where its parameters are).
        options: the steps to apply (default :class:`FastPathOptions`: all on, except compile).
        copy_model: work on a deep copy (default), leaving ``model`` untouched. False rewrites
            ``model`` itself (saves memory; it is then for inference only).
        **overrides: fields of :class:`FastPathOptions`, e.g. ``precision="fp32"``, ``compile=True``.
    Returns:
        An :class:`InferenceModel` in eval mode on ``device``.

    Example::

        fast = optimize_for_inference(generator, "cpu")
        ihc = fast(he).ihc          # he: [N, 3, H, W] in [-1, 1]
    """
    opts = replace(options or FastPathOptions(), **overrides)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    dev = torch.device(device)
    m = copy.deepcopy(model) if copy_model else model
    m = m.to(dev).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    report: dict[str, Any] = {"bn_folded": 0, "inplace_acts": 0, "modconv": 0, "skipped": []}
    if opts.fold_bn:
        report["bn_folded"] = fold_batchnorm(m)
    if opts.inplace:
        report["inplace_acts"] = inplace_activations(m)
    report["modconv"] = set_modconv_mode(m, opts.modconv)
    if opts.skip_unused:
        report["skipped"] = skip_training_heads(m)
    if opts.channels_last:
        m = m.to(memory_format=torch.channels_last)
    return InferenceModel(m, opts, dev, report)


def eager_model(model: nn.Module, device: torch.device | str | None = None) -> InferenceModel:
    """The plain eager fp32 path in the same wrapper (every step off): the baseline of ``--compare``."""
    return optimize_for_inference(model, device, EAGER)
