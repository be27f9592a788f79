"""Baselines the paper compares with, in the same framework (registry, trainer, data, evaluation).

Importing this package registers ``pix2pix``, ``pyramidpix2pix``, ``pix2pixhd``, ``bcistainer`` and ``asp`` with
:mod:`derestainer.models.registry`. What makes each baseline is its generator *and* its preset
(``configs/pix2pix.yaml``, ``pyramidpix2pix.yaml``, ``pix2pixhd.yaml``, ``bcistainer.yaml``, ``asp.yaml``: loss weights, discriminator
scales, optimiser); see docs/benchmarks.md.
"""

from derestainer.models.baselines import asp, bcistainer  # noqa: F401  (registration side effects)
from derestainer.models.baselines.pix2pix import ResnetBlock, ResnetGenerator, build_resnet_generator

__all__ = ["ResnetBlock", "ResnetGenerator", "build_resnet_generator"]
