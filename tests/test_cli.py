"""The command line: help text, config errors as one line, config printing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rsdino.cli import _build_parser, main
from rsdino.config.loader import load_config


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


def test_top_level_help_lists_every_command_with_its_summary() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rsdino.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    # The subcommand group argparse keeps among the parser's actions.
    (commands,) = [action for action in _build_parser()._actions if action.dest == "command"]
    summaries = {choice.dest: choice.help for choice in commands._choices_actions}
    assert {"train", "data", "eval", "attention", "export"} <= summaries.keys()
    listed = " ".join(out.split())  # argparse wraps long summaries
    for name, summary in summaries.items():
        assert f"{name} {' '.join(summary.split())}" in listed, name


def test_the_parser_and_config_layer_import_no_torch() -> None:
    """`rsdino --help`, argument errors and config checks cost no torch start-up (seconds)."""
    script = (
        "import sys\n"
        "from rsdino.cli import main\n"
        "assert main(['train', '--config', 'vitl16_short_multimodal', '--print-config']) == 0\n"
        "print(sorted(name for name in sys.modules if name.partition('.')[0] == 'torch'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "[]"


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


def test_print_config_prints_the_config_the_run_would_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["train", "--config", "quickstart", "--print-config", "optim.epochs=3"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    expected = load_config("quickstart", ["optim.epochs=3"])
    assert printed == expected and printed.optim.epochs == 3
    assert printed != load_config("quickstart")  # the override made it through


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
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed == load_config("quickstart", ["optim.epochs=3", "train.seed=7"])
