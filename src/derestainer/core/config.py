"""Configuration: frozen dataclasses ← YAML preset ← ``--set key=value`` overrides.

The resolved config is plain data (:func:`to_dict`), written into every run folder and checkpoint,
and read back with :func:`from_dict`, which rejects unknown keys so that a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
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
    stop_ihc_grad: bool = False         # stop gradients of L_H into the IHC branch
    demodulate: bool = True
    ndf: int = 64                       # discriminator base width
    d_layers: int = 3                   # PatchGAN conv layers (3 → 70×70 receptive field)
    d_scales: int = 2                   # multi-scale discriminator (paper: 512 and 256)
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
    focal_gamma: float = 2.0
    pyramid: float = 0.0                # Gaussian-pyramid L1 (PyramidPix2Pix); 0 for DeReStainer
    pyramid_levels: int = 4
    l1: float = 0.0                     # plain L1 in model space (pix2pix λ=100 on [-1,1])


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
#: Fields of :class:`ModelConfig` that are sizes (≥ 1) and counts (≥ 0).
_POSITIVE_MODEL = ("ngf", "n_down", "ndf", "d_layers", "d_scales")
_COUNT_MODEL = ("n_head_down", "n_fusion_blocks", "h_embed_dim")


def check_values(obj: Any, where: str = "") -> None:
    """Raise :class:`ConfigError` for a value out of its range in a :class:`ModelConfig`, :class:`DataConfig`
    or :class:`TrainConfig` (its learning-rate schedule keys).

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
    elif isinstance(obj, TrainConfig):
        if obj.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{where}lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {obj.lr_schedule!r}")
        if not 0.0 <= obj.lr_decay_start <= 1.0:
            raise ConfigError(f"{where}lr_decay_start: expected a fraction of train.steps in [0, 1], got {obj.lr_decay_start!r}")
        if obj.warmup_steps < 0:
            raise ConfigError(f"{where}warmup_steps: expected an integer ≥ 0, got {obj.warmup_steps!r}")
    elif isinstance(obj, DataConfig):
        if obj.size < 1:
            raise ConfigError(f"{where}size: expected an image size ≥ 1 px, got {obj.size!r}")
        if not math.isfinite(obj.mpp) or obj.mpp <= 0:
            raise ConfigError(f"{where}mpp: expected a positive number of µm per pixel, got {obj.mpp!r}")
        if not 0.0 <= obj.val_fraction < 1.0:
            raise ConfigError(f"{where}val_fraction: expected a fraction of the training files in [0, 1), got {obj.val_fraction!r}")


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


# --------------------------------------------------------------------------------------------------
# Composition: one model's preset laid over another preset's widths (the benchmark, the speed bench)

#: Model names that stand for a preset of another name.
MODEL_ALIASES: dict[str, str] = {"derestainer": "paper"}


def _flatten_sections(d: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(s, k): v for s, sec in d.items() for k, v in sec.items()}


def preset_delta(model: str) -> dict[str, dict[str, Any]]:
    """How the preset (or YAML file) of ``model`` differs from ``paper``, as nested plain data.

    >>> preset_delta("no_dab")
    {'loss': {'dab': 0.0}}

    Raises:
        ConfigError: ``model`` is neither a preset nor a readable YAML file (the message names it).
    """
    name = MODEL_ALIASES.get(model, model)
    try:
        mine = _flatten_sections(to_dict(load_config(name)))
    except ConfigError as exc:
        raise ConfigError(f"model {model!r}: {exc}") from None
    ref = _flatten_sections(to_dict(load_config("paper")))
    delta: dict[str, dict[str, Any]] = {}
    for (s, k), v in mine.items():
        if ref.get((s, k)) != v:
            delta.setdefault(s, {})[k] = v
    return delta


def split_target(item: str) -> tuple[str | None, str]:
    """``'pix2pix:model.ngf=16'`` → ``('pix2pix', 'model.ngf=16')``; without a ``MODEL:`` prefix → ``(None, item)``."""
    key = item.split("=", 1)[0]
    if ":" in key:
        target, rest = item.split(":", 1)
        return target.strip(), rest
    return None, item


def compose_model_config(model: str, base: str = "tiny", overrides: Sequence[str] = ()) -> Config:
    """The config of ``model`` at the width/data/training class of ``base``.

    ``base ⊕ (preset(model) − paper) ⊕ overrides``: e.g. ``pix2pix`` on ``tiny`` gets tiny's widths
    and image size but pix2pix's generator, losses, discriminator scales and optimiser settings.
    With ``base='paper'`` this is exactly the model's preset. An override ``MODEL:section.key=value``
    applies to that model only (e.g. ``pix2pix:model.ngf=16`` to match capacities).

    Raises:
        ConfigError: unknown model or base, malformed override, unknown section or key.
    """
    try:
        d = to_dict(load_config(base))
    except ConfigError as exc:
        raise ConfigError(f"base config: {exc}") from None
    for s, sec in preset_delta(model).items():
        d[s].update(sec)
    for entry in overrides:
        target, item = split_target(entry)
        if target is not None and target != model:
            continue
        (s, k), v = parse_override(item)
        if s not in d:
            raise ConfigError(f"override {item!r}: unknown section {s!r}; valid: {', '.join(d)}")
        d[s][k] = v
    try:
        cfg: Config = from_dict(d)
    except ConfigError as exc:
        raise ConfigError(f"model {model!r}: {exc}") from None
    return cfg
