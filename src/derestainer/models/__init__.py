"""Generators, discriminators and classifiers.

Importing this package registers every built-in generator (:mod:`.generator`, :mod:`.baselines`)
with :mod:`.registry`, which itself imports no model.
"""

from derestainer.models import baselines, generator  # noqa: F401  (registration side effects)
from derestainer.models.registry import create_generator, list_generators, register_generator

__all__ = ["create_generator", "list_generators", "register_generator"]
