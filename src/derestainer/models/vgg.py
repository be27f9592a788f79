"""The frozen VGG-19 of pix2pixHD's perceptual loss, from a local weights file (nothing is downloaded).

pix2pixHD (Wang et al. 2018, ``models/networks.py``: ``Vgg19``, ``VGGLoss``) compares the outputs of
five slices of torchvision's ImageNet-trained VGG-19 ``features`` — up to relu1_1, relu2_1,
relu3_1, relu4_1 and relu5_1 (layers 0–1, 2–6, 7–11, 12–20, 21–29) — weighted 1/32 … 1, and
feeds it the images in ``[-1, 1]`` as they are, without ImageNet normalisation; so does this one.

The weights must be a local safetensors file holding torchvision's ``vgg19`` state dict (the
``features.*`` tensors; a ``classifier.*`` part is ignored), e.g. written once on a machine that
has them with ``safetensors.torch.save_file(torchvision.models.vgg19(weights="DEFAULT").state_dict(), path)``.
Without a file the VGG term is off (the trainer says so).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from derestainer.core.errors import CheckpointError
from derestainer.core.fileformat import check_finite, check_fit, read_header

#: The end (exclusive) of each of pix2pixHD's slices of ``vgg19().features``.
VGG_SLICE_ENDS = (2, 7, 12, 21, 30)


def _vgg19_features() -> nn.Sequential:
    from torchvision.models import vgg19

    return vgg19(weights=None).features[: VGG_SLICE_ENDS[-1]]


class VGG19Features(nn.Module):
    """Five slices of VGG-19's convolutional part; ``forward(x) -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1]``.

    ``x``: ``[N, 3, H, W]`` (model space, as pix2pixHD). Frozen: no parameter requires a gradient,
    and it stays in eval mode (it has no batch norm or dropout in these layers anyway).
    """

    def __init__(self, features: nn.Sequential | None = None) -> None:
        super().__init__()
        self.features = features if features is not None else _vgg19_features()
        starts = (0, *VGG_SLICE_ENDS[:-1])
        self.slices = [(a, b) for a, b in zip(starts, VGG_SLICE_ENDS)]
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG19Features:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for a, b in self.slices:
            for i in range(a, b):
                x = self.features[i](x)
            outs.append(x)
        return outs


def load_vgg19(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> VGG19Features:
    """:class:`VGG19Features` with the weights of a local safetensors file of torchvision's ``vgg19``.

    Raises:
        CheckpointError: missing or unreadable file, or tensors that do not fit VGG-19's ``features``.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such VGG-19 weights file (loss.vgg_weights)")
    with torch.device("meta"):
        skeleton = VGG19Features()
    expected = skeleton.state_dict()
    def in_slices(name: str) -> bool:  # a features.N.* tensor of the layers used (a foreign key counts as unexpected)
        parts = name.split(".")
        return len(parts) > 2 and parts[0] == "features" and (not parts[1].isdigit() or int(parts[1]) < VGG_SLICE_ENDS[-1])

    header = {k: v for k, v in read_header(p).items() if k in expected or in_slices(k)}
    check_fit(p, header, expected, "torchvision's VGG-19 features")
    try:
        tensors = {k: v for k, v in load_file(str(p), device="cpu").items() if k in expected}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: corrupt VGG-19 weights ({exc})") from exc
    check_finite(p, tensors)
    model = VGG19Features()
    model.load_state_dict(tensors, strict=True)
    return model.to(device)
