"""The command line: help text, config errors as one line, config printing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rsdino.cli import main


def test_help_lists_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rsdino.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--config", "--output-dir", "--no-resume", "--print-config", "key=value"):
        assert option in out
    assert "quickstart" in out and "vitl16_short_s2" in out


def test_top_level_help_lists_train() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rsdino.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "train" in out


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["train", "--config", "does_not_exist"], "unknown preset 'does_not_exist'"),
        (["train", "--config", "quickstart", "optim.nope=1"], "optim.nope"),
        (
            ["train", "--config", "quickstart", "optim.base_lr=[1,"],
            "override optim.base_lr: the value '[1,' is not valid YAML",
        ),
    ],
)
def test_config_errors_are_one_line(
    argv: list[str], pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert pattern in err


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "quickstart", "--print-config", "optim.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out


def test_a_malformed_yaml_file_is_one_line_naming_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "run.yaml"
    bad.write_text("optim:\n  base_lr: [1,\n")
    assert main(["train", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rsdino: config error: config file '{bad}' is not valid YAML: did not find expected "
        "node content (line 3, column 1)"
    )


def test_options_may_stand_between_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", "quickstart", "optim.epochs=3", "--print-config", "train.seed=7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "seed: 7" in out
