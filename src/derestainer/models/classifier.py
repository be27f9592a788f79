"""The HER2 IHC classifier: comparator C for ``L_cmp`` and evaluator for the semantic metrics (docs/method.md, "Training", "Evaluation").

One class serves both roles. Trained by ``derestainer train-classifier`` on real IHC with its HER2
level (0, 1+, 2+, 3+); as the comparator it is loaded and :func:`freeze`-d during translation
training; as the evaluator (a second model, trained separately: another seed and, where data allows,
other images) it embeds ground-truth and generated IHC for the top-k / kNN metrics.

Inputs are in model space (float ``[-1, 1]``, ``NCHW``), like every generator's output, so that the
comparator can be applied to generated images directly; the ImageNet normalisation torchvision's
ResNets expect is done inside :meth:`HER2Classifier.normalize`.

Nothing is downloaded, and nothing is unpickled: ImageNet initial weights are read from a local
safetensors file (a PyTorch ``.pth`` is converted once with ``scripts/convert_weights.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from derestainer.core.errors import CheckpointError
from derestainer.core.fileformat import (
    check_finite,
    check_fit,
    expect_kind,
    load_tensors,
    read_header,
    read_meta,
    save_tensors,
    unwrap_model,
)
from derestainer.core.ranges import signed_to_unit, uint8_to_signed

#: An architecture of :class:`HER2Classifier`.
ClassifierArch = Literal["resnet50", "resnet18", "tiny"]
#: Architectures accepted by :class:`HER2Classifier`.
ARCHS: tuple[ClassifierArch, ...] = get_args(ClassifierArch)
#: torchvision's ImageNet statistics (RGB, in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLASSIFIER_FORMAT = 1
#: Suffixes of pickle-based PyTorch weight files, refused with the one-off conversion to safetensors.
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")
CONVERT_HINT = ("convert it once to safetensors, in an environment you trust: "
                "python scripts/convert_weights.py {path} {stem}.safetensors")
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _tiny_backbone() -> tuple[nn.Module, int]:
    """A ~6 k-parameter CNN for tests: 3 stride-2 conv-BN-ReLU blocks (8, 16, 32) → global average pool."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in (8, 16, 32):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
    return nn.Sequential(*layers), c_in


def _resnet_backbone(arch: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet (random init, ``weights=None``) whose ``fc`` is an identity: it returns pooled features."""
    from torchvision import models  # slow to import, and only the resnet architectures need it

    net = getattr(models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class HER2Classifier(nn.Module):
    """HER2 level classifier on IHC images.

    Args:
        arch: ``resnet50`` (paper), ``resnet18``, or ``tiny`` (a very small CNN for tests).
        n_levels: number of classes (4: HER2 0, 1+, 2+, 3+).
        pretrained_weights: optional LOCAL file of ImageNet weights for the torchvision ResNet
            (see :func:`load_backbone_weights`); its ``fc`` layer is ignored. Never downloaded.

    Attributes:
        feature_dim: size ``D`` of the pooled feature vector (2048 for resnet50, 512 for resnet18, 32 for tiny).
    """

    mean: torch.Tensor  # ImageNet statistics, non-persistent buffers
    std: torch.Tensor

    def __init__(
        self, arch: ClassifierArch = "resnet50", n_levels: int = 4, pretrained_weights: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        if n_levels < 2:
            raise ValueError(f"n_levels must be at least 2, got {n_levels}")
        self.arch = arch
        self.n_levels = int(n_levels)
        if arch == "tiny":
            self.backbone, self.feature_dim = _tiny_backbone()
        else:
            self.backbone, self.feature_dim = _resnet_backbone(arch)
        self.fc = nn.Linear(self.feature_dim, self.n_levels)
        # Not persistent: constants, kept out of checkpoints (and out of ImageNet weight files' key sets).
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._frozen = False
        if pretrained_weights is not None:
            if arch == "tiny":
                raise ValueError("pretrained ImageNet weights only apply to the resnet architectures, not 'tiny'")
            load_backbone_weights(self.backbone, pretrained_weights)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model space ``[-1, 1]`` → ``[0, 1]`` → ImageNet-normalised. ``[N,3,H,W]`` → ``[N,3,H,W]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [N,3,H,W] in [-1,1], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError("expected float images in model space [-1,1]; convert uint8 with prepare_images()")
        return (signed_to_unit(x) - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate, global-average-pooled features (not L2-normalised). ``[N,3,H,W]`` → ``[N, D]``."""
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Level logits. ``[N,3,H,W]`` in ``[-1,1]`` → ``[N, n_levels]``."""
        return self.fc(self.features(x))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, n_levels], features [N, D])`` in one pass (evaluation wants both)."""
        f = self.features(x)
        return self.fc(f), f

    @property
    def frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> HER2Classifier:
        # A frozen classifier stays in eval mode even when a parent module's .train() recurses into it:
        # its BatchNorm must use the running statistics learnt on real IHC, never the generator's batch.
        return super().train(mode and not self._frozen)


def freeze(model: ModuleT) -> ModuleT:
    """Freeze a classifier for use as the comparator: eval mode, ``requires_grad=False`` everywhere.

    For a :class:`HER2Classifier` the eval mode is pinned: a later ``.train()`` (called directly or
    by a parent module) leaves it in eval mode, so its BatchNorm keeps using running statistics.
    Gradients still flow *through* it to its input (``L_cmp`` needs them w.r.t. the generated
    image), so do not wrap the generated branch in ``torch.no_grad()``; the real-IHC branch may be.

    How the trainer should hold it: as a plain attribute of the trainer or loss object, not as a
    sub-module of the generator — so that it is neither saved into generator checkpoints, nor
    handed to the optimiser, nor wrapped by DistributedDataParallel (each rank loads the same file).
    The pinned eval mode is the safety net if it does end up inside a module tree.

    Returns:
        The same module (for chaining).
    """
    if isinstance(model, HER2Classifier):
        model._frozen = True
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# ImageNet initialisation from a local file


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a local safetensors weight file; a pickle-based ``.pth``/``.pt``/``.bin`` is never opened."""
    hint = CONVERT_HINT.format(path=path, stem=path.with_suffix(""))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file (ImageNet weights are never downloaded; give a local file)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: PyTorch pickle files are not loaded (unpickling can run code); {hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); if it is a PyTorch file, {hint}") from None


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Load ImageNet weights of a torchvision ResNet from a local file into ``backbone`` (fc excluded).

    Accepted: safetensors only (a ``.pth``/``.pt``/``.bin`` file is refused unopened, with the command
    that converts it once: ``scripts/convert_weights.py``); keys as in torchvision/timm (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), an optional
    ``module.`` or ``backbone.`` prefix is stripped; ``fc.*`` is ignored (the HER2 head is new).

    Returns:
        ``{'loaded': [...], 'ignored': [...]}`` key lists.
    Raises:
        CheckpointError: unreadable file, missing weights, or shapes of another architecture.
    """
    p = Path(path)
    state = _read_weight_file(p)
    clean: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in state.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            ignored.append(k)
            continue
        clean[k] = v
    own = backbone.state_dict()
    unexpected = sorted(set(clean) - set(own))
    # num_batches_tracked is absent from older torchvision files; it only matters for momentum=None.
    missing = sorted(k for k in set(own) - set(clean) if not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: weights do not fit this ResNet (missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}); is it another architecture?"
        )
    bad = [k for k, v in clean.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{p}: tensor shapes do not fit this ResNet (e.g. {bad[0]}: {tuple(clean[bad[0]].shape)} vs "
            f"{tuple(own[bad[0]].shape)}); is it another architecture?"
        )
    # float16/bfloat16/float64 weights are cast; integers or booleans in place of floats are refused
    wrong = [k for k, v in clean.items() if v.is_floating_point() != own[k].is_floating_point()]
    if wrong:
        raise CheckpointError(f"{p}: tensor {wrong[0]!r} is {clean[wrong[0]].dtype}, expected {own[wrong[0]].dtype}")
    check_finite(p, clean)
    backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in clean.items()}, strict=False)
    return {"loaded": sorted(clean), "ignored": sorted(ignored)}


# --------------------------------------------------------------------------------------------------
# Input preparation shared by training, the comparator and evaluation


def prepare_images(images: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 ``[N,3,H,W]`` (or ``[3,H,W]``) → float model space ``[N,3,size,size]`` in ``[-1, 1]``.

    The whole image is resized (bilinear, antialiased) to ``size × size``, as in classifier training,
    so that evaluation embeds images exactly as the classifier saw them. ``size=None`` keeps the size.
    Float input is taken to be in model space already and only resized.
    """
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        x = uint8_to_signed(x)
    elif not x.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {x.dtype}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(-1.0, 1.0)
    return x


def names_hash(names: Iterable[str]) -> str:
    """SHA-256 of the sorted image names, one per line: identifies a training set in checkpoint metadata."""
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(n.encode("utf-8") + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_classifier(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a classifier as one safetensors file, atomically.

    The metadata gets ``kind='classifier'``, ``format``, ``arch`` and ``n_levels`` from the model;
    ``meta`` should add the training facts: ``size`` (input px), ``seed``, ``train_images_hash``
    (:func:`names_hash`), ``accuracy`` and anything else JSON-able.
    """
    module = unwrap_model(model)  # DDP / torch.compile wrappers
    if not isinstance(module, HER2Classifier):
        raise TypeError(f"save_classifier expects a HER2Classifier, got {type(module).__name__}")
    full = {**meta, "kind": "classifier", "format": CLASSIFIER_FORMAT, "arch": module.arch, "n_levels": module.n_levels}
    return save_tensors(path, module.state_dict(), full)


def classifier_meta(meta: dict[str, Any], path: str | os.PathLike[str]) -> tuple[ClassifierArch, int]:
    """``(arch, n_levels)`` of a classifier file's metadata, checked.

    Raises:
        CheckpointError: another kind of file (e.g. a generator), an architecture this version does
            not know, ``n_levels`` not an integer ≥ 2, or a ``size`` that is not a positive integer.
    """
    expect_kind(meta, "classifier", path)
    arch, n_levels, size = meta.get("arch"), meta.get("n_levels"), meta.get("size")
    if arch not in ARCHS or isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise CheckpointError(
            f"{path}: classifier metadata names arch={arch!r}, n_levels={n_levels!r}, which this version cannot build"
        )
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise CheckpointError(f"{path}: classifier metadata size={size!r}, expected its input size in px (an integer ≥ 1)")
    return arch, n_levels


def read_classifier_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a classifier file (header only), checked with :func:`classifier_meta`."""
    meta = read_meta(path)
    classifier_meta(meta, path)
    return meta


def load_classifier(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[HER2Classifier, dict[str, Any]]:
    """Load a classifier written by :func:`save_classifier`: ``(model in eval mode, metadata)``.

    The metadata and the stored tensors' names, shapes and dtypes are checked (against the model
    built on the ``meta`` device, which takes no memory) before any weight is read.

    Raises:
        CheckpointError: missing or unreadable file, another kind of checkpoint (e.g. a generator),
            an unknown architecture, or weights that do not fit it.
    """
    meta = read_meta(path)
    arch, n_levels = classifier_meta(meta, path)
    header = read_header(path)
    with torch.device("meta"):
        skeleton = HER2Classifier(arch=arch, n_levels=n_levels)
    check_fit(path, header, skeleton.state_dict(), f"classifier {arch!r}")
    del skeleton
    tensors, _ = load_tensors(path, device="cpu")
    check_finite(path, tensors)
    model = HER2Classifier(arch=arch, n_levels=n_levels)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def load_comparator(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[HER2Classifier, dict[str, Any]]:
    """:func:`load_classifier` then :func:`freeze`: the comparator C for ``L_cmp``, ``(frozen model, metadata)``.

    ``meta['size']`` is the resolution it was trained at; its pooled features are most meaningful for
    inputs near that size (resize with :func:`prepare_images` or train the comparator at the
    translation resolution).
    """
    model, meta = load_classifier(path, device)
    return freeze(model), meta


def independence_warnings(comparator_meta: dict[str, Any], evaluator_meta: dict[str, Any]) -> list[str]:
    """Reasons why an evaluator may not be independent of the comparator (docs/method.md, "Evaluation"); empty if none found.

    The evaluator should differ in seed and, where data allows, in training images (``--subset even|odd``).
    """
    for role, meta in (("comparator", comparator_meta), ("evaluator", evaluator_meta)):
        if meta.get("kind", "classifier") != "classifier":
            raise CheckpointError(f"the {role}: this is a {meta.get('kind')} checkpoint, expected a classifier checkpoint")
    out: list[str] = []
    if comparator_meta.get("seed") is not None and comparator_meta.get("seed") == evaluator_meta.get("seed"):
        out.append(f"comparator and evaluator were trained with the same seed ({evaluator_meta.get('seed')})")
    h1, h2 = comparator_meta.get("train_images_hash"), evaluator_meta.get("train_images_hash")
    if h1 and h1 == h2:
        out.append("comparator and evaluator were trained on the same images")
    return out
