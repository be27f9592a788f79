"""Composition: one model's preset laid over another preset's widths (the benchmark, the speed bench)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from derestainer.core.config import Config, from_dict, load_config, parse_override, to_dict
from derestainer.core.errors import ConfigError

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
