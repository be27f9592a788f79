#!/usr/bin/env python
"""Convert a PyTorch ``.pth``/``.pt``/``.bin`` state dict (e.g. torchvision's ImageNet ResNet weights)
to safetensors, once, so that ``derestainer train-classifier --pretrained`` can read it.

    python scripts/convert_weights.py resnet50-11ad3fa6.pth resnet50.safetensors

WARNING: this is the only place in derestainer that calls ``torch.load``. A ``.pth`` file is a
pickle; even with ``weights_only=True`` (used here, which refuses arbitrary classes) reading it runs
an unpickler on the file. Run this script only on files from a source you trust, in an environment
you trust (e.g. a throw-away container), and give derestainer the ``.safetensors`` it writes.
derestainer itself never opens a pickle.

Accepted input: a plain ``{name: tensor}`` state dict, optionally wrapped as ``{"state_dict": ...}``
(Lightning) or ``{"model": ...}`` (timm/DeiT training checkpoints). Names are kept as they are
(derestainer strips a ``module.``/``backbone.`` prefix and ignores ``fc.*`` when loading). The output
is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled PyTorch state dict (``torch.load(weights_only=True)``; see the warning above)."""
    obj = torch.load(str(src), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{src}: expected a state dict of named tensors")
    return obj


def convert(src: Path, dst: Path) -> int:
    """Write the state dict in ``src`` to the safetensors file ``dst``; return the number of tensors."""
    state = read_state_dict(src)
    # safetensors refuses tensors that share memory: give each its own contiguous copy
    flat = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        save_file(flat, str(tmp), metadata={"converted_from": src.name})
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return len(flat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the .pth/.pt/.bin state dict (a pickle: trusted files only)")
    parser.add_argument("dst", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if args.dst.suffix != ".safetensors":
        parser.error(f"{args.dst}: the output should end in .safetensors")
    try:
        n = convert(args.src, args.dst)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dst}: {n} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
