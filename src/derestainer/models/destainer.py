"""DeStainer (paper §2.1): stain separation + encoder, and the two small heads f_H and f_level.

The same :class:`DeStainer` embeds the H-channel image of the H&E input and of the real IHC, so
that ``L_H`` can align them (docs/method.md, “Networks”).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from derestainer.core.config import ENCODER_INPUTS
from derestainer.core.errors import ConfigError
from derestainer.core.ranges import signed_to_unit, unit_to_signed
from derestainer.layers.blocks import ConvNormAct, DownBlock
from derestainer.stain import RGB_FROM_HED, stain_channel, stain_matrix_from_vectors
from derestainer.stain.functional import compute_dtype, no_autocast

#: Maximum condition number of a stain matrix: beyond it its inverse turns rounding noise into stain.
MAX_STAIN_CONDITION = 1e6


def _read_matrix_file(path: Path) -> object:
    """The raw content of a ``.npy`` or ``.json`` stain-matrix file (validated by the caller)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r")  # the header first: no huge read
        except (ValueError, OSError, EOFError) as exc:
            raise ConfigError(f"{path}: stain matrix file is not a plain .npy array ({exc})") from None
        if not isinstance(arr, np.ndarray):  # an .npz archive under a .npy name
            arr.close()
            raise ConfigError(f"{path}: stain matrix file is an .npz archive, expected a plain .npy array")
        if arr.shape != (3, 3) or arr.dtype.kind not in "iuf":
            raise ConfigError(f"{path}: stain matrix file holds a {arr.dtype} array of shape {arr.shape}, expected 3x3 numbers")
        return np.array(arr, dtype=np.float64)
    if suffix != ".json":
        raise ConfigError(f"{path}: stain matrix file has the unsupported extension {path.suffix!r}; use .json or .npy")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as exc:
        raise ConfigError(f"{path}: stain matrix file is not valid JSON ({str(exc)[:200]})") from None
    if isinstance(data, dict) and "rgb_from_hed" in data:
        data = data["rgb_from_hed"]
    if isinstance(data, dict):
        unknown = set(data) - {"h", "e", "dab"}
        if unknown:
            raise ConfigError(f"{path}: stain matrix file has unknown keys {sorted(unknown)}; expected rgb_from_hed or h, e, dab")
        try:
            data = stain_matrix_from_vectors(data.get("h"), data.get("e"), data.get("dab"))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: stain matrix file: {exc}") from None
    return data


def load_stain_matrix(spec: str | Path | np.ndarray | None) -> np.ndarray:
    """A 3×3 ``rgb_from_hed`` (one stain per row, OD colours) from a config value.

    Args:
        spec: ``None``/``'ruifrok'`` (scikit-image's Ruifrok matrix), an array, or a path to
            ``.npy`` (a 3×3 array, never a pickle) or ``.json`` (``[[…],[…],[…]]``, ``{"rgb_from_hed": [[…]…]}`` or
            ``{"h": [r,g,b], "e": […], "dab": […]}``; one vector may be left out and is completed).
    Returns:
        ``[3, 3]`` float64, finite and well conditioned (hence invertible).
    Raises:
        ConfigError: a missing or unreadable file, not a finite 3×3 matrix, or a singular one; the
            message starts with the file's path.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "ruifrok"):
        return RGB_FROM_HED.copy()
    if isinstance(spec, np.ndarray):
        data: object = spec
        where = "stain matrix"
    else:
        path = Path(spec)
        where = f"{path}: stain matrix file"
        if not path.is_file():
            raise ConfigError(f"{path}: stain matrix file does not exist; give 'ruifrok' or a .json/.npy file with a 3x3 rgb_from_hed")
        data = _read_matrix_file(path)
    try:
        m = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: expected a 3x3 list of numbers ({exc})") from None
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        raise ConfigError(f"{where}: expected a finite 3x3 rgb_from_hed matrix, got shape {m.shape}")
    if abs(np.linalg.det(m)) < 1e-8 or not np.linalg.cond(m) < MAX_STAIN_CONDITION:
        raise ConfigError(f"{where}: the matrix is singular (stain vectors linearly dependent)")
    return m


class StainSeparation(nn.Module):
    """Channel images of one stain in model space: ``unit_to_signed(T⁻¹(T(signed_to_unit(x))·P_k))`` (eq. 1–2).

    The stain matrix is a pair of buffers, so it is saved and loaded with the weights.

    Always computed in float32 with autocast off, whatever the caller's precision, and returned in
    float32 (float64 for a float64 input; see :mod:`derestainer.stain.functional`): training under
    bf16 autocast and inference share one rule, and a following conv under autocast casts as it needs.

    Shapes: ``forward(x [N, 3, H, W] in [-1, 1], stain) -> [N, 3, H, W] in [-1, 1]``.
    """

    def __init__(self, rgb_from_hed: np.ndarray | torch.Tensor | None = None) -> None:
        super().__init__()
        m = load_stain_matrix(None) if rgb_from_hed is None else np.asarray(rgb_from_hed, dtype=np.float64)
        m = load_stain_matrix(m)  # validates
        self.register_buffer("rgb_from_hed", torch.tensor(m, dtype=torch.float32))
        self.register_buffer("hed_from_rgb", torch.tensor(np.linalg.inv(m), dtype=torch.float32))

    def forward(self, x: torch.Tensor, stain: str = "h") -> torch.Tensor:
        with no_autocast(x):  # the model-space maps too, in fp32
            x = x.to(compute_dtype(x))
            y = stain_channel(signed_to_unit(x), stain, rgb_from_hed=self.rgb_from_hed, hed_from_rgb=self.hed_from_rgb)
            return unit_to_signed(y)


class DeStainer(nn.Module):
    """Stain separation + encoder: stem (reflect-pad, 7×7 conv, norm, LeakyReLU 0.2), then ``n_down``
    down-sampling blocks, widths ``ngf·[1, 2, 4, 8]`` for ``n_down = 3``.

    Args:
        ngf: stem width.
        n_down: number of stride-2 blocks (paper: 3).
        encoder_input: what the stem sees: ``h`` (the H-channel image, paper), ``rgb`` (the image
            itself) or ``h+rgb`` (both, 6 channels). The IHC branch gets the same transform.
        norm: ``batch`` | ``none``.
        rgb_from_hed: stain matrix (default Ruifrok).
    Shapes:
        ``forward(x [N, 3, H, W]) -> [N, ngf·2^n_down, H/2^n_down, W/2^n_down]``.
    """

    def __init__(
        self,
        ngf: int = 64,
        n_down: int = 3,
        encoder_input: str = "h",
        norm: str = "batch",
        rgb_from_hed: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"encoder_input must be one of {ENCODER_INPUTS}, got {encoder_input!r}")
        self.encoder_input = encoder_input
        self.separation = StainSeparation(rgb_from_hed)
        in_ch = 6 if encoder_input == "h+rgb" else 3
        self.stem = ConvNormAct(in_ch, ngf, 7, padding=3, padding_mode="reflect", norm=norm, act="lrelu")
        self.down = nn.Sequential(*[DownBlock(ngf * 2**i, ngf * 2 ** (i + 1), norm=norm) for i in range(n_down)])
        self.out_channels = ngf * 2**n_down

    def encoder_in(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's input for image ``x`` (model space): ``[N, 3 or 6, H, W]``."""
        if self.encoder_input == "rgb":
            return x
        h = self.separation(x, "h")
        return h if self.encoder_input == "h" else torch.cat([h, x], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.stem(self.encoder_in(x)))


class HEmbedHead(nn.Module):
    """f_H: ``n_down`` down-sampling blocks → global average pool → vector (→ optional linear).

    Shapes: ``[N, C, h, w] -> [N, embed_dim or C]``.
    """

    def __init__(self, channels: int, n_down: int = 2, embed_dim: int = 0, norm: str = "batch") -> None:
        super().__init__()
        self.down = nn.Sequential(*[DownBlock(channels, channels, norm=norm) for _ in range(n_down)])
        self.proj = nn.Linear(channels, embed_dim) if embed_dim > 0 else nn.Identity()
        self.out_features = embed_dim if embed_dim > 0 else channels

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.proj(self.down(feat).mean(dim=(2, 3)))

    def forward_with_map(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embedding [N, D], feature map before pooling [N, C, h', w'])``: the map feeds L_H's InfoNCE variant."""
        fmap = self.down(feat)
        return self.proj(fmap.mean(dim=(2, 3))), fmap


class HPredictor(nn.Module):
    """SimSiam's predictor on f_H's embedding (``loss.h_mode: simsiam``): ``Linear → ReLU → Linear``.

    Without SimSiam's batch norm in the hidden layer, so that it works at any per-device batch size
    (their ablation: without it the predictor still prevents collapse). Shapes: ``[N, D] -> [N, D]``.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LevelHead(nn.Module):
    """f_level: ``n_down`` down-sampling blocks → global average pool → linear → ``n_levels`` logits.

    Shapes: ``[N, C, h, w] -> [N, n_levels]``.
    """

    def __init__(self, channels: int, n_down: int = 2, n_levels: int = 4, norm: str = "batch") -> None:
        super().__init__()
        self.down = nn.Sequential(*[DownBlock(channels, channels, norm=norm) for _ in range(n_down)])
        self.fc = nn.Linear(channels, n_levels)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(self.down(feat).mean(dim=(2, 3)))
