"""The command line as a user meets it first: --help, --version, one line per sub-command."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from derestainer import __version__
from derestainer.cli import main

EXPECTED = {"demo", "synth", "separate", "train-classifier", "train", "export", "translate", "translate-slide",
            "evaluate", "benchmark", "bench"}


def test_every_sub_command_is_listed_with_one_whole_line() -> None:
    res = CliRunner().invoke(main, ["--help"], terminal_width=100)
    assert res.exit_code == 0
    lines = res.output.split("Commands:")[1].strip().splitlines()
    names = {ln.split()[0] for ln in lines}
    assert names == EXPECTED
    assert len(lines) == len(EXPECTED), "a help line wrapped onto a second line"
    assert not any(ln.rstrip().endswith("...") for ln in lines), "a short help was cut off"
    for name in EXPECTED:
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, name


def test_version_and_module_entry_point() -> None:
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output
    proc = subprocess.run([sys.executable, "-m", "derestainer", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_unknown_command_is_a_clear_error() -> None:
    res = CliRunner().invoke(main, ["translat"])
    assert res.exit_code != 0 and "No such command" in res.output
