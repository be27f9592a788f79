"""The command line as a user meets it first: --help, --version, one line per sub-command."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from derestainer.cli import main
from derestainer.core.version import __version__

EXPECTED = {"demo", "synth", "separate", "train-classifier", "train", "export", "translate", "translate-slide",
            "evaluate", "floor", "benchmark", "bench"}


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


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback() -> None:
    """The group maps every DerestainerError to ``Error: ...`` in one place; other exceptions are bugs."""
    import click

    from derestainer.core.errors import CheckpointError, ConfigError

    @click.command("raise-for-test")
    @click.argument("what")
    def raiser(what: str) -> None:
        if what == "config":
            raise ConfigError("x.yaml: expected a mapping")
        if what == "checkpoint":
            err = CheckpointError("m.safetensors: not a generator")
            err.exit_code = 2
            raise err
        raise KeyError("a bug")

    main.add_command(raiser)
    try:
        res = CliRunner().invoke(main, ["raise-for-test", "config"])
        assert res.exit_code == 1 and res.output == "Error: x.yaml: expected a mapping\n"
        res = CliRunner().invoke(main, ["raise-for-test", "checkpoint"])
        assert res.exit_code == 2 and res.output.strip() == "Error: m.safetensors: not a generator"
        res = CliRunner().invoke(main, ["raise-for-test", "bug"])
        assert res.exit_code == 1 and isinstance(res.exception, KeyError)
    finally:
        main.commands.pop("raise-for-test")


def test_train_steps_sets_train_steps(tmp_path) -> None:
    import yaml

    for extra in ([], ["--set", "train.steps=3"]):  # --steps wins over --set: it is the option named for it
        res = CliRunner().invoke(main, ["train", "-c", "tiny", "--steps", "7", *extra, "--out", str(tmp_path / "r"), "--dry-run"])
        assert res.exit_code == 0, res.output
        assert yaml.safe_load(res.output)["train"]["steps"] == 7
    res = CliRunner().invoke(main, ["train", "-c", "tiny", "--steps", "0", "--dry-run"])
    assert res.exit_code == 2 and "--steps" in res.output
