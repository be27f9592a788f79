"""A tiny model registry (after timm's ``_registry.py``): no string reflection.

The registry imports no model. Each model module registers itself with :func:`register_generator`
when it is imported, and :mod:`derestainer.models` imports every built-in model module, so that
importing anything from ``derestainer.models`` makes all built-in generators available.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from derestainer.core.errors import ConfigError

_GENERATORS: dict[str, Callable[..., nn.Module]] = {}


def register_generator(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn(model_cfg) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _GENERATORS:
            raise KeyError(f"generator {name!r} registered twice")
        _GENERATORS[name] = fn
        return fn

    return deco


def list_generators() -> list[str]:
    """Names of every registered generator."""
    return sorted(_GENERATORS)


def create_generator(model_cfg: Any) -> nn.Module:
    """Build the generator named ``model_cfg.name`` from a :class:`~derestainer.core.config.ModelConfig`.

    Raises:
        ConfigError: no generator is registered under that name.
    """
    try:
        fn = _GENERATORS[model_cfg.name]
    except KeyError:
        raise ConfigError(f"model.name: unknown model {model_cfg.name!r}; available: {', '.join(sorted(_GENERATORS))}") from None
    return fn(model_cfg)
