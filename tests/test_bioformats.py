"""Runs ``tests/bioformats_checks.py`` (every whole-slide output read with Bio-Formats, as QuPath reads
it) in a process of its own: the JVM must not start inside this test process (see that module)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("bioformats_checks.py")


def test_outputs_read_with_bioformats_as_qupath_does(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
           str(CHECKS)]
    res = subprocess.run(cmd, cwd=CHECKS.parents[1], env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    if not re.search(r"\b\d+ passed\b", out):  # all skipped (no Java, no jar): say why, as a skip
        reasons = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", out)
        pytest.skip(reasons[0] if reasons else "the Bio-Formats checks were all skipped")
    assert not re.search(r"\b\d+ skipped\b", out), out[-4000:]  # Java started: every check must have run
