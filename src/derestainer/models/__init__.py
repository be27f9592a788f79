"""Generators, discriminators and classifiers; see :mod:`derestainer.models.registry`."""
