"""Configuration: frozen dataclasses ← YAML preset ← ``--set key=value`` overrides.

The resolved config is plain data (:func:`to_dict`), written into every run folder and checkpoint,
and read back with :func:`from_dict`, which rejects unknown keys so that a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from derestainer.core.errors import ConfigError

#: Mixed precision of training: ``auto`` (bf16 on CUDA), ``bf16`` or ``off`` (fp32).
AmpMode = Literal["auto", "bf16", "off"]
#: An optional feature: ``auto`` (when available), ``on`` or ``off``.
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ModelConfig:
    """Generator and discriminator architecture (docs/method.md, “Networks”)."""

    name: str = "derestainer"          # registry name: derestainer | pix2pix | pyramidpix2pix | ...
    ngf: int = 64                       # generator base width; encoder widths ngf·[1,2,4,8]
    n_down: int = 3                     # encoder down-sampling blocks (paper: 3)
    n_head_down: int = 2                # down-sampling blocks in f_H and f_level (paper: 2)
    n_fusion_blocks: int = 9            # modulated residual blocks (paper: 9)
    n_levels: int = 4                   # HER2 classes 0, 1+, 2+, 3+
    encoder_input: str = "h"            # h (paper) | rgb | h+rgb
    norm: str = "batch"                 # batch | none (never instance: seams on whole slides)
    h_embed_dim: int = 0                # f_H output size; 0 = width of the last f_H block
    h_predictor: int = 0                # hidden width of a SimSiam predictor on f_H (loss.h_mode simsiam); 0 = none
    stop_ihc_grad: bool = False         # stop gradients of L_H into the IHC branch
    demodulate: bool = True
    ndf: int = 64                       # discriminator base width
    d_layers: int = 3                   # PatchGAN conv layers (3 → 70×70 receptive field)
    d_scales: int = 2                   # multi-scale discriminator (paper: 512 and 256)
    d_input: str = "he+ihc"             # what D sees: he+ihc (conditional, pix2pix) | ihc (BCIStainer)
    d_norm: str = "batch"               # discriminator norm: batch | instance | none
    stain_matrix: str = "ruifrok"       # ruifrok | a path to a 3x3 rgb_from_hed (.json/.npy)


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (paper §2.4, §3.1). A weight of 0 switches its term off (and skips its compute)."""

    stain: float = 2.0
    h: float = 1.0
    dab: float = 1.0
    content: float = 13.0
    ssim: float = 1.0
    mae: float = 10.0
    cmp: float = 2.0
    level: float = 5.0
    gan: float = 1.0
    gan_mode: str = "lsgan"             # lsgan (DeReStainer, pix2pixHD) | vanilla (BCE: pix2pix, BCI's PyramidPix2Pix)
    gan_smooth: float = 0.0             # random label smoothing U(0, s) of the GAN targets (BCIStainer: 0.1)
    focal_gamma: float = 2.0
    focal_alpha: tuple[float, ...] = ()  # per-class weights of the focal loss (BCIStainer: 0.5, 0.2, 0.2, 0.1); () = none
    h_mode: str = "cosine"              # L_H: cosine (paper) | simsiam (needs model.h_predictor) | infonce
    h_tau: float = 0.1                  # InfoNCE temperature (h_mode infonce)
    dab_mode: str = "clamped"           # L_DAB on: clamped (paper: DAB channel images) | od (DAB concentration before the clamp)
    ssim_win: int = 11                  # L_ssim window (paper, scikit-image: 11; BCIStainer: 9)
    ssim_sigma: float = 1.5             # L_ssim Gaussian σ (paper: 1.5; BCIStainer: 2.375)
    cmp_start: float = 0.0              # L_cmp from this fraction of train.steps on (BCIStainer: 1/3)
    pyramid: float = 0.0                # Gaussian-pyramid L1 (PyramidPix2Pix); 0 for DeReStainer
    pyramid_levels: int = 4
    l1: float = 0.0                     # plain L1 in model space (pix2pix λ=100 on [-1,1])
    lowres: float = 0.0                 # MAE of a low-resolution output head, out.aux["ihc_low"] (BCIStainer: 10)
    nce: float = 0.0                    # CUT's PatchNCE, H&E ↔ generated, on G's encoder features (ASP: lambda_NCE 10)
    nce_tau: float = 0.07               # PatchNCE temperature of both NCE terms (ASP/CUT: nce_T 0.07)
    nce_all_negatives: bool = False     # negatives from every image of the minibatch, not only the same one (ASP: False)
    asp: float = 0.0                    # adaptive supervised PatchNCE, generated ↔ real IHC (ASP: lambda_asp 10)
    asp_mode: str = "lambda_linear"     # ASP weighting "<schedule>_<lookup>" (ASP: lambda_linear) | none (plain supervised PatchNCE)
    asp_decay_start: float = 0.75       # "lambda" schedule: fraction of training before the weights adapt (ASP: 30 of 40 epochs)
    asp_gp: float = 0.0                 # ASP's Gaussian-pyramid L1, 6 levels, weights 1/64 … 1 (ASP: lambda_gp 10)
    fm: float = 0.0                     # discriminator feature matching (pix2pixHD: 10)
    vgg: float = 0.0                    # VGG-19 perceptual loss (pix2pixHD: 10); runs only with vgg_weights
    vgg_weights: str = ""               # local torchvision VGG-19 weights (.safetensors); "" = VGG loss off, with a warning


@dataclass(frozen=True)
class DataConfig:
    """Where paired data lives and how it is loaded."""

    root: str = ""                      # dataset root (BCI / MIST layout) or "" with he_dir/ihc_dir
    layout: str = "bci"                 # bci | mist | folders
    he_dir: str = ""                    # for layout=folders
    ihc_dir: str = ""
    train_split: str = "train"
    val_split: str = ""                 # "" = carve val_fraction of the training files; else a split (e.g. MIST's val)
    val_fraction: float = 0.1           # with val_split "": training files held out for validation (0 = none)
    val_seed: int = 0                   # seed of that hold-out (a seeded permutation of the names, not stratified)
    size: int = 512                     # training resolution (paper: 1024 → 512)
    crop: int = 0                       # random crop after resizing (0 = none)
    flip: bool = True
    rot90: bool = True
    mpp: float = 0.92                   # microns per pixel at training size (BCI 1024 px ≈ 0.46 µm/px)
    workers: int = 0
    cache: bool = False                 # keep decoded, resized uint8 pairs in memory
    levels: str = ""                    # layout=folders: CSV "name,level" (else BCI-style names, else -1)
    interpolation: str = "bilinear"     # resize filter: bilinear (antialiased) | area | bicubic | nearest


#: ``train.lr_schedule`` values (training.schedule).
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = 100_000
    batch_size: int = 4
    lr: float = 1e-5                    # AdamW (paper)
    d_lr: float = 0.0                   # 0 = same as lr
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-2
    grad_accum: int = 1
    amp: AmpMode = "auto"               # auto (bf16 on CUDA) | bf16 | off
    channels_last: bool = True          # on CUDA
    seed: int = 0
    deterministic: bool = False
    comparator: str = ""                # classifier checkpoint for L_cmp ("" → L_cmp off, with a warning)
    log_every: int = 50
    sample_every: int = 1000
    ckpt_every: int = 1000
    val_every: int = 0                  # 0 = once per epoch
    keep_last: int = 3
    best_metric: str = "ssim"
    max_bad_steps: int = 5              # consecutive non-finite losses before stopping
    out: str = "runs/derestainer"
    device: str = "auto"                # auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda | cuda:N
    sync_bn: bool = True                # SyncBatchNorm across ranks (multi-GPU CUDA runs only)
    val_max: int = 0                    # validation pairs per validation (0 = the whole held-out split)
    sample_count: int = 4               # rows of each sample grid (fixed held-out pairs)
    tensorboard: Switch = "auto"        # auto (if installed) | on | off; log.jsonl is always written
    lr_schedule: str = "constant"       # constant | linear | cosine (decay to zero at train.steps), G and D
    lr_decay_start: float = 0.0         # fraction of train.steps held at train.lr before the decay
    warmup_steps: int = 0               # linear warm-up from 0 over this many steps (0 = none)
    warmup_fraction: float = 0.0        # or over this fraction of train.steps (used when warmup_steps is 0)
    ema: float = 0.0                    # decay of an exponential moving average of G, saved as the model (0 = off; BCIStainer 0.99)
    ema_start: int = 0                  # steps before the average starts (it copies G until then; BCIStainer 100)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-data (JSON/YAML-safe) form of a config dataclass; tuples become lists."""
    d = dataclasses.asdict(obj)
    return _untuple(d)


def _untuple(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _untuple(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_untuple(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple and typing.get_args(tp)[-1:] == (Ellipsis,):
        item = typing.get_args(tp)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of values, got {value!r}")
        return tuple(_coerce(v, item, where) for v in value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        # YAML reads a bare on/off as true/false, and earlier versions stored that as "True"/"False"
        word = value
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
            word = "on" if str(value).lower() == "true" else "off"
        if word not in allowed:
            read_as = f" (read as {word!r})" if word != value else ""
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}{read_as}")
        return word
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return "" if value is None else str(value)
    return value


def from_dict(d: dict[str, Any], cls: type = Config, where: str = "") -> Any:
    """Build a (nested) config dataclass from plain data; unknown keys are an error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(v, tp, f"{where}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{where}{k}")
    obj = cls(**kwargs)
    check_values(obj, where)
    return obj


# --------------------------------------------------------------------------------------------------
# Value checks (ranges and choices that the types alone do not say)

#: What the generator's encoder sees: the H-channel image (paper), the RGB image, or both.
ENCODER_INPUTS: tuple[str, ...] = ("h", "rgb", "h+rgb")
#: ``loss.h_mode``: L_H as the paper's cosine, SimSiam, or InfoNCE on f_H's maps (losses.stain_terms).
H_MODES: tuple[str, ...] = ("cosine", "simsiam", "infonce")
#: ``loss.dab_mode``: L_DAB on DAB channel images (the paper's, clamped) or on DAB optical density.
DAB_MODES: tuple[str, ...] = ("clamped", "od")
#: ``loss.asp_mode`` schedules: how ASP's ``p`` (the weight of uniform weighting) follows training progress.
ASP_SCHEDULES: tuple[str, ...] = ("sigmoid", "linear", "lambda", "zero")
#: ``loss.asp_mode`` lookups: the weight of a patch as a function of its positive's cosine.
ASP_LOOKUPS: tuple[str, ...] = ("top", "linear", "bell", "uniform")
#: ``model.d_input``: what the discriminator sees.
D_INPUTS: tuple[str, ...] = ("he+ihc", "ihc")
#: Fields of :class:`ModelConfig` that are sizes (≥ 1) and counts (≥ 0).
_POSITIVE_MODEL = ("ngf", "n_down", "ndf", "d_layers", "d_scales")
_COUNT_MODEL = ("n_head_down", "n_fusion_blocks", "h_embed_dim")


def check_values(obj: Any, where: str = "") -> None:
    """Raise :class:`ConfigError` for a value out of its range in a :class:`ModelConfig`, :class:`LossConfig`,
    :class:`DataConfig` or :class:`TrainConfig` (its learning-rate schedule and EMA keys).

    Model widths and block counts, ``n_levels ≥ 2``, ``encoder_input`` one of :data:`ENCODER_INPUTS`;
    ``data.size ≥ 1`` and ``data.mpp`` a positive finite number. Other config classes pass unchecked.
    """
    if isinstance(obj, ModelConfig):
        for name in _POSITIVE_MODEL:
            if getattr(obj, name) < 1:
                raise ConfigError(f"{where}{name}: expected an integer ≥ 1, got {getattr(obj, name)!r}")
        for name in _COUNT_MODEL:
            if getattr(obj, name) < 0:
                raise ConfigError(f"{where}{name}: expected an integer ≥ 0, got {getattr(obj, name)!r}")
        if obj.n_levels < 2:
            raise ConfigError(f"{where}n_levels: expected at least 2 HER2 levels, got {obj.n_levels!r}")
        if obj.encoder_input not in ENCODER_INPUTS:
            raise ConfigError(f"{where}encoder_input: expected one of {', '.join(ENCODER_INPUTS)}, got {obj.encoder_input!r}")
        if not obj.name:
            raise ConfigError(f"{where}name: expected a model name, got {obj.name!r}")
        _check_choice(obj.d_input, D_INPUTS, f"{where}d_input")
        _check_choice(obj.d_norm, ("batch", "instance", "none"), f"{where}d_norm")
        if obj.h_predictor < 0:
            raise ConfigError(f"{where}h_predictor: expected an integer ≥ 0, got {obj.h_predictor!r}")
    elif isinstance(obj, LossConfig):
        _check_loss(obj, where)
    elif isinstance(obj, Config):
        _check_across(obj, where)
    elif isinstance(obj, TrainConfig):
        if not (obj.ema == 0.0 or 0.0 < obj.ema < 1.0) or obj.ema_start < 0:
            raise ConfigError(f"{where}ema: expected 0 (off) or a decay in (0, 1) and ema_start ≥ 0, "
                              f"got {obj.ema!r}, {obj.ema_start!r}")
        if obj.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{where}lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {obj.lr_schedule!r}")
        if not 0.0 <= obj.lr_decay_start <= 1.0:
            raise ConfigError(f"{where}lr_decay_start: expected a fraction of train.steps in [0, 1], got {obj.lr_decay_start!r}")
        if obj.warmup_steps < 0:
            raise ConfigError(f"{where}warmup_steps: expected an integer ≥ 0, got {obj.warmup_steps!r}")
        if not 0.0 <= obj.warmup_fraction <= 1.0:
            raise ConfigError(f"{where}warmup_fraction: expected a fraction of train.steps in [0, 1], got {obj.warmup_fraction!r}")
    elif isinstance(obj, DataConfig):
        if obj.size < 1:
            raise ConfigError(f"{where}size: expected an image size ≥ 1 px, got {obj.size!r}")
        if not math.isfinite(obj.mpp) or obj.mpp <= 0:
            raise ConfigError(f"{where}mpp: expected a positive number of µm per pixel, got {obj.mpp!r}")
        if not 0.0 <= obj.val_fraction < 1.0:
            raise ConfigError(f"{where}val_fraction: expected a fraction of the training files in [0, 1), got {obj.val_fraction!r}")


def _check_choice(value: str, choices: tuple[str, ...], where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")


def _check_loss(obj: LossConfig, where: str) -> None:
    """The loss options that have a range: modes, temperatures, fractions, the SSIM window."""
    _check_choice(obj.h_mode, H_MODES, f"{where}h_mode")
    _check_choice(obj.dab_mode, DAB_MODES, f"{where}dab_mode")
    if not obj.h_tau > 0:
        raise ConfigError(f"{where}h_tau: expected a temperature > 0, got {obj.h_tau!r}")
    for name in ("gan_smooth", "cmp_start"):
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ConfigError(f"{where}{name}: expected a number in [0, 1], got {getattr(obj, name)!r}")
    if obj.ssim_win < 3 or obj.ssim_win % 2 == 0 or not obj.ssim_sigma > 0:
        raise ConfigError(f"{where}ssim_win: expected an odd window ≥ 3 and ssim_sigma > 0, "
                          f"got {obj.ssim_win!r}, {obj.ssim_sigma!r}")
    if not obj.nce_tau > 0 or not 0.0 <= obj.asp_decay_start <= 1.0:
        raise ConfigError(f"{where}nce_tau: expected a temperature > 0 and asp_decay_start in [0, 1], "
                          f"got {obj.nce_tau!r}, {obj.asp_decay_start!r}")
    schedule, _, lookup = obj.asp_mode.partition("_")
    if obj.asp_mode != "none" and (schedule not in ASP_SCHEDULES or lookup not in ASP_LOOKUPS):
        raise ConfigError(f"{where}asp_mode: expected 'none' or '<schedule>_<lookup>' with a schedule in "
                          f"{', '.join(ASP_SCHEDULES)} and a lookup in {', '.join(ASP_LOOKUPS)}, got {obj.asp_mode!r}")
    if any(not (math.isfinite(a) and a >= 0) for a in obj.focal_alpha):
        raise ConfigError(f"{where}focal_alpha: expected class weights ≥ 0, got {list(obj.focal_alpha)!r}")


def _check_across(cfg: Config, where: str) -> None:
    """Options that must agree across sections: SimSiam needs DeReStainer's predictor; the focal
    loss's class weights, one per HER2 level."""
    if cfg.loss.h_mode == "simsiam" and cfg.model.name == "derestainer" and cfg.model.h_predictor <= 0 \
            and cfg.loss.stain * cfg.loss.h != 0:
        raise ConfigError(f"{where}loss.h_mode: simsiam needs the f_H predictor; set model.h_predictor (e.g. 128)")
    if cfg.loss.focal_alpha and len(cfg.loss.focal_alpha) != cfg.model.n_levels:
        raise ConfigError(f"{where}loss.focal_alpha: {len(cfg.loss.focal_alpha)} class weights for "
                          f"model.n_levels={cfg.model.n_levels}")


def _deep_merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (``configs/*.yaml``)."""
    files = resources.files("derestainer").joinpath("configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _find_yaml(name_or_path: str, base_dir: Path | None) -> tuple[str, str, Path | None]:
    """``(text, source name, file)`` of a YAML path or preset; a relative path in ``extends`` is looked
    up beside the file that names it first, then from the working directory."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        for cand in ([base_dir / p] if base_dir is not None and not p.is_absolute() else []) + [p]:
            if cand.is_file():
                try:
                    return cand.read_text(), str(cand), cand.resolve()
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"{cand}: cannot read ({exc})") from None
    f = resources.files("derestainer").joinpath("configs", f"{name_or_path}.yaml")
    if not f.is_file():
        where = f" (named by {base_dir})" if base_dir is not None else ""
        raise ConfigError(f"{name_or_path}: no preset or YAML file of that name{where}; "
                          f"presets: {', '.join(preset_names())}")
    return f.read_text(), f"preset {name_or_path}", None


def _load_yaml(name_or_path: str, base_dir: Path | None = None, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    text, src, file = _find_yaml(name_or_path, base_dir)
    if src in chain:
        raise ConfigError(f"{src}: 'extends' loops back to itself ({' → '.join((*chain, src))})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: expected a mapping at the top level")
    for key, val in data.items():
        if key != "extends" and not isinstance(val, dict):
            raise ConfigError(f"{src}: section {key!r} must be a mapping of keys to values, got {val!r}")
    parent = data.pop("extends", None)
    if parent:
        if not isinstance(parent, str):
            raise ConfigError(f"{src}: 'extends' must name a preset or a YAML file, got {parent!r}")
        data = _deep_merge(_load_yaml(parent, file.parent if file is not None else None, (*chain, src)), data)
    if not chain and file is not None:  # the file the user gave: its own mistakes are reported naming it
        try:
            from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{src}: {exc}") from None
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'train.lr=2e-4'`` → (['train', 'lr'], 2e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be section.key, e.g. train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def load_config(preset: str = "paper", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset name (or YAML path) plus ``section.key=value`` overrides into a :class:`Config`."""
    data = _load_yaml(preset)
    for item in overrides:
        (section, key), value = parse_override(item)
        data = _deep_merge(data, {section: {key: value}})
    return from_dict(data)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Copy of ``cfg`` with some fields of some sections changed: ``replace(cfg, train={'steps': 10})``."""
    return from_dict(_deep_merge(to_dict(cfg), sections))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
