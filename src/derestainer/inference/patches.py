"""Translate H&E patches (images of any size) into virtual IHC, with the predicted HER2 level.

The building blocks are shared with whole-slide inference (:mod:`.wsi`): :func:`load_model`,
:func:`pick_device`, :func:`predict` (one batch through the model, optional test-time augmentation).

Sizes: a generator needs height and width divisible by ``2^n_down`` (DeReStainer: 8). Inputs are
padded by reflection up to the next multiple and the output is cropped back, so the output has
the input's size. Resolution: the model was trained at ``mpp`` µm/px (stored in the model file);
``input_mpp`` (when given) resizes each image to that resolution before the model and resizes the
result back to the input size; otherwise images are assumed to be at the training resolution.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..io import (
    ImageReadError,
    list_images,
    read_image,
    write_image,
    write_json,
    write_text,
)
from ..training.checkpoint import CheckpointError

GENERATOR_FILE = "generator.safetensors"
LEVEL_NAMES_4 = ("0", "1+", "2+", "3+")


# --------------------------------------------------------------------------------------------------
# Model and device


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The generator file to load for ``path``.

    Accepts an exported model file (``*.safetensors``); a training checkpoint folder
    (``<run>/checkpoints/step-NNNNNNN/``, uses its ``generator.safetensors``); or a run folder (its
    final ``generator.safetensors`` when training finished, else the checkpoint its ``latest``
    pointer names, else its newest checkpoint).

    Raises:
        CheckpointError: nothing loadable there.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such model file or checkpoint folder")
    if (p / GENERATOR_FILE).is_file():
        return p / GENERATOR_FILE
    from ..training.state import resolve_checkpoint as resolve_run

    try:
        ckpt = resolve_run(p)
    except CheckpointError:
        ckpt = None
    if ckpt is not None and (ckpt / GENERATOR_FILE).is_file():
        return ckpt / GENERATOR_FILE
    raise CheckpointError(
        f"{p}: no {GENERATOR_FILE} here (expected an exported model file, a checkpoint folder, or a run folder)"
    )


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA if available, else Apple MPS if available, else CPU; otherwise as given.

    Under ``torchrun`` (``LOCAL_RANK`` set) ``auto``/``cuda`` pick ``cuda:LOCAL_RANK``.
    """
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


@dataclass
class LoadedModel:
    """A generator ready for inference with what inference needs to know about it.

    Attributes:
        model: the generator in eval mode on ``device``.
        mpp: microns per pixel at the training size.
        size: training size in px.
        multiple: input height/width must be divisible by this.
        level_names: names of the HER2 classes of f_level.
        path: the file it was loaded from; meta: its metadata.
    """

    model: torch.nn.Module
    device: torch.device
    mpp: float
    size: int
    multiple: int
    level_names: tuple[str, ...]
    path: Path
    meta: dict[str, Any]


def size_multiple(model: torch.nn.Module, cfg: Any) -> int:
    """Input size multiple of a generator: its ``size_multiple`` attribute, else ``2**cfg.model.n_down``."""
    m = getattr(model, "size_multiple", None)
    return int(m) if m else 2 ** int(cfg.model.n_down)


def load_model(
    checkpoint: str | os.PathLike[str],
    device: str | torch.device = "auto",
    *,
    fast: bool = True,
    precision: str = "auto",
) -> LoadedModel:
    """Load a generator for inference from a model file, checkpoint folder or run folder.

    Args:
        fast: run it through :func:`derestainer.inference.optimize.optimize_for_inference`
            (BatchNorm folded into convolutions, channels_last, the faster modulated-convolution form,
            inference mode); outputs equal the plain model's to float rounding.
        precision: ``auto`` (bf16 on CUDA and on CPUs with native bf16, else fp32), ``fp32`` or ``bf16``;
            fixed here for the fast path (``predict`` then accepts ``auto`` or this same value). With
            ``fast=False`` it is not used here: the plain model runs at the precision given to
            ``predict``, whose ``auto`` is bf16 autocast on CUDA (stain separation included) and fp32
            elsewhere.
    Raises:
        CheckpointError: missing, corrupt, or not a generator (e.g. a classifier file).
    """
    from ..training.checkpoint import load_generator

    dev = device if isinstance(device, torch.device) else pick_device(device)
    path = resolve_checkpoint(checkpoint)
    model, cfg, meta = load_generator(path, device=dev)
    if fast:
        from .optimize import optimize_for_inference

        model = optimize_for_inference(model, dev, precision=precision, copy_model=False)
    n = int(cfg.model.n_levels)
    names = LEVEL_NAMES_4 if n == 4 else tuple(str(k) for k in range(n))
    mpp = float(meta.get("mpp", cfg.data.mpp))
    return LoadedModel(model=model, device=dev, mpp=mpp, size=int(meta.get("size", cfg.data.size)),
                       multiple=size_multiple(model, cfg), level_names=names, path=path, meta=meta)


def export_model(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, mpp: float | None = None) -> dict[str, Any]:
    """Write the generator of a run/checkpoint as one exported model file; return its metadata.

    The weights are loaded and checked against the architecture first (a file that does not load
    is never exported). ``mpp`` overrides the training resolution recorded in the config
    (``data.mpp``). Other metadata (step, epoch) is kept; ``exported_from`` names the source.

    Raises:
        CheckpointError: no generator there, or the file is another kind of checkpoint.
    """
    from ..config import replace
    from ..training.checkpoint import load_generator, read_meta, save_generator

    src = resolve_checkpoint(checkpoint)
    model, cfg, meta = load_generator(src, device="cpu")
    if mpp is not None:
        cfg = replace(cfg, data={"mpp": float(mpp)})
    extra = {k: v for k, v in meta.items() if k not in ("kind", "format", "model", "config", "size", "mpp")}
    extra["exported_from"] = "/".join(src.parts[-3:])
    save_generator(out, model, cfg, extra=extra)
    return read_meta(out)


# --------------------------------------------------------------------------------------------------
# Pure tensor helpers


def pad_to_multiple(x: torch.Tensor, multiple: int, min_size: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad ``[N, C, H, W]`` at the bottom/right up to multiples of ``multiple`` (and at least ``min_size``).

    Reflection padding (no dark border for the network to react to); replication where the image
    is too small to reflect.

    Returns:
        (padded tensor, original ``(H, W)``) — crop with ``y[..., :H, :W]``.
    """
    h, w = x.shape[-2:]
    th = max(-(-h // multiple) * multiple, min_size)
    tw = max(-(-w // multiple) * multiple, min_size)
    ph, pw = th - h, tw - w
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square (k = 0..7) applied to the last two dims.

    ``k % 4`` quarter turns, preceded by a horizontal flip when ``k ≥ 4``.
    """
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1))


def inverse_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`dihedral` (``inverse_dihedral(dihedral(x, k), k) == x``)."""
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return x


def uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 3, H, W]`` → float ``[-1, 1]``."""
    return x.float().div_(127.5).sub_(1.0)


def model_to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Model space ``[-1, 1]`` → ``uint8`` (rounded, clamped)."""
    return ((y.float().clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8)


def autocast_context(device: torch.device, precision: str = "auto") -> Any:
    """bf16 autocast on CUDA (``auto``/``bf16``); nothing elsewhere or with ``fp32``."""
    import contextlib

    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolved_precision(model: torch.nn.Module, device: torch.device, precision: str = "auto") -> str:
    """The precision ``predict(model, ..., precision=precision)`` really runs at: ``fp32`` or ``bf16``.

    An :class:`~.optimize.InferenceModel` (the fast path) applies its own precision, fixed when it was
    built (``load_model(..., precision=...)``); ``precision`` must then be ``auto`` or that same value.
    A plain model follows :func:`autocast_context`: ``auto`` is bf16 autocast on CUDA (the whole
    model, stain separation included) and fp32 elsewhere.

    Raises:
        ValueError: an explicit ``precision`` other than the one an InferenceModel was built with.
    """
    from .optimize import PRECISIONS, InferenceModel

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(model, InferenceModel):
        if precision != "auto" and precision != model.precision:
            raise ValueError(
                f"precision={precision!r} asked for, but this InferenceModel was built to run in "
                f"{model.precision!r}; rebuild it with precision={precision!r} (load_model(..., precision=...)) "
                f"or pass precision='auto'")
        return str(model.precision)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return "bf16"
    return "fp32"


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    he: torch.Tensor,
    *,
    multiple: int = 1,
    tta: bool = False,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch through a generator.

    Args:
        model: generator in eval mode (``forward(he) -> GenOutput``).
        he: ``[N, 3, H, W]`` in ``[-1, 1]`` on the model's device (any H, W: padded to ``multiple``).
        multiple: size multiple the model needs.
        tta: average the 8 dihedral transforms (each output transformed back before averaging;
            level probabilities averaged too).
        precision: for a plain model, ``auto`` (bf16 autocast on CUDA — the whole model, stain
            separation included — fp32 elsewhere), ``bf16`` or ``fp32``. An
            :class:`~.optimize.InferenceModel` runs at the precision it was built with (its
            ``precision``, stain separation kept fp32) and no outer autocast is applied; ``auto``
            or that same precision is accepted (see :func:`resolved_precision`).

    Returns:
        (virtual IHC float32 ``[N, 3, H, W]`` in ``[-1, 1]``, level probabilities float32 ``[N, K]`` or None).

    Raises:
        ValueError: ``precision`` conflicts with the precision an InferenceModel was built with.
    """
    import contextlib

    from .optimize import InferenceModel

    resolved_precision(model, he.device, precision)  # refuses a conflicting precision
    fast = isinstance(model, InferenceModel)
    x, (h, w) = pad_to_multiple(he, multiple, min_size=2 * multiple)
    ks = range(8) if tta else (0,)
    ihc_sum: torch.Tensor | None = None
    prob_sum: torch.Tensor | None = None
    for k in ks:
        with contextlib.nullcontext() if fast else autocast_context(x.device, precision):
            out = model(dihedral(x, k))
        y = inverse_dihedral(out.ihc.float(), k)
        ihc_sum = y if ihc_sum is None else ihc_sum + y
        if out.level_logits is not None:
            p = torch.softmax(out.level_logits.float(), dim=1)
            prob_sum = p if prob_sum is None else prob_sum + p
    assert ihc_sum is not None
    ihc = (ihc_sum / len(ks))[..., :h, :w]
    probs = None if prob_sum is None else prob_sum / len(ks)
    return ihc, probs


def resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` with antialiasing when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def translate_array(
    lm: LoadedModel,
    images: Sequence[np.ndarray],
    *,
    tta: bool = False,
    input_mpp: float | None = None,
    precision: str = "auto",
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Translate same-sized ``uint8 [H, W, 3]`` H&E images (one batch).

    Returns:
        (virtual IHC ``uint8 [H, W, 3]`` per image, probabilities ``[N, K]`` or None).
    """
    if not images:
        return [], None
    x = torch.from_numpy(np.stack([np.ascontiguousarray(im.transpose(2, 0, 1)) for im in images]))
    x = uint8_to_model(x.to(lm.device))
    h, w = x.shape[-2:]
    if input_mpp is not None and input_mpp > 0 and abs(input_mpp / lm.mpp - 1) > 1e-6:
        f = input_mpp / lm.mpp  # model px per input px
        x = resize_batch(x, (max(1, round(h * f)), max(1, round(w * f))))
    ihc, probs = predict(lm.model, x, multiple=lm.multiple, tta=tta, precision=precision)
    ihc = resize_batch(ihc, (h, w))
    out = model_to_uint8(ihc).permute(0, 2, 3, 1).cpu().numpy()
    return list(out), (None if probs is None else probs.cpu().numpy())


# --------------------------------------------------------------------------------------------------
# Files and folders


@dataclass(frozen=True)
class Job:
    """One input image and where its output goes (``rel``: output path relative to the output folder)."""

    src: Path
    rel: Path


def collect_inputs(inputs: Iterable[str | os.PathLike[str]], recursive: bool = True, suffix: str = ".png") -> list[Job]:
    """Input images with output paths that mirror the folder structure.

    A file ``a/b.jpg`` given directly → ``b.png``; a folder ``F`` → each image ``F/x/y.tif`` →
    ``x/y.png`` (only ``F``'s own images unless ``recursive``).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: two inputs would write the same output file, or no images were found.
    """
    jobs: list[Job] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in list_images(p, recursive=recursive):
                jobs.append(Job(f, f.relative_to(p).with_suffix(suffix)))
        elif p.is_file():
            jobs.append(Job(p, Path(p.name).with_suffix(suffix)))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    seen: dict[Path, Path] = {}
    for j in jobs:
        if j.rel in seen:
            raise ValueError(f"{seen[j.rel]} and {j.src} would both be written to {j.rel}; translate them separately")
        seen[j.rel] = j.src
    if not jobs:
        raise ValueError("no images found in the inputs (suffixes: .png .jpg .jpeg .tif .tiff .bmp .webp)")
    return jobs


def translate_files(
    lm: LoadedModel,
    jobs: Sequence[Job],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    tta: bool = False,
    input_mpp: float | None = None,
    precision: str = "auto",
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Translate images to ``out_dir`` and write ``predictions.csv`` and ``predictions.json`` there.

    Images of equal size are batched together (up to ``batch_size``). Each row of the predictions:
    input path, output path (relative to ``out_dir``), predicted level name, and one probability
    per level (empty when the model has no f_level head).

    Raises:
        ImageReadError: an input image cannot be read (nothing is written for it; earlier outputs stay).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    groups: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}

    def flush(key: tuple[int, int]) -> None:
        items = groups.pop(key, [])
        if not items:
            return
        ihc, probs = translate_array(lm, [im for _, im in items], tta=tta, input_mpp=input_mpp, precision=precision)
        for b, (idx, _) in enumerate(items):
            job = jobs[idx]
            write_image(out / job.rel, ihc[b])
            rows[idx] = _prediction_row(job, probs[b] if probs is not None else None, lm.level_names)
        if progress is not None:
            progress(len(items))

    for idx, job in enumerate(jobs):
        im = read_image(job.src)
        key = im.shape[:2]
        groups.setdefault(key, []).append((idx, im))
        if len(groups[key]) >= batch_size:
            flush(key)
        elif sum(len(g) for g in groups.values()) >= 4 * batch_size:
            flush(max(groups, key=lambda k: len(groups[k])))  # many sizes: bound the images held
    for key in list(groups):
        flush(key)
    ordered = [rows[i] for i in range(len(jobs))]
    write_predictions(out, ordered, lm)
    return ordered


def _prediction_row(job: Job, probs: np.ndarray | None, names: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"input": str(job.src), "output": job.rel.as_posix()}
    if probs is None:
        row["level"] = None
        row["probabilities"] = None
    else:
        row["level"] = names[int(np.argmax(probs))]
        row["probabilities"] = {n: float(p) for n, p in zip(names, probs)}
    return row


def write_predictions(out_dir: Path, rows: Sequence[dict[str, Any]], lm: LoadedModel) -> None:
    """``predictions.csv`` (input, output, level, p_<level>...) and ``predictions.json`` (with model info)."""
    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    wr.writerow(["input", "output", "level"] + [f"p_{n}" for n in lm.level_names])
    for r in rows:
        probs = r["probabilities"]
        wr.writerow([r["input"], r["output"], r["level"] or ""]
                    + ([f"{probs[n]:.6f}" for n in lm.level_names] if probs else [""] * len(lm.level_names)))
    write_text(out_dir / "predictions.csv", buf.getvalue())
    write_json(out_dir / "predictions.json", {
        "model": str(lm.path),
        "model_name": lm.meta.get("model"),
        "model_mpp": lm.mpp,
        "levels": list(lm.level_names),
        "has_level_head": any(r["probabilities"] is not None for r in rows),
        "images": list(rows),
    })


__all__ = [
    "ImageReadError", "Job", "LoadedModel", "collect_inputs", "dihedral", "inverse_dihedral", "load_model",
    "model_to_uint8", "pad_to_multiple", "pick_device", "predict", "resolve_checkpoint", "resolved_precision",
    "translate_array", "translate_files", "uint8_to_model", "write_predictions",
]
