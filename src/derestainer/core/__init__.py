"""The foundation layer: what every other part of derestainer may use, and which uses none of them.

- :mod:`.errors` — :class:`~.errors.DerestainerError` and every user-facing error type;
- :mod:`.levels` — HER2 level names, parsing, the label-CSV format, the confusion matrix;
- :mod:`.io` — image reading and atomic writes; :mod:`.fileformat` — safetensors + JSON files;
- :mod:`.guard` — outputs never overlap inputs, output locks, multi-file outputs complete or marked;
- :mod:`.runs` — the run-folder layout and how a path names a checkpoint;
- :mod:`.config` — the configuration schema; :mod:`.device` — device choice;
  :mod:`.ranges` — value-range conversions.

Nothing here is imported by ``import derestainer.core``: each module is imported where it is used,
so that e.g. SynthBCI workers never import torch.
"""
