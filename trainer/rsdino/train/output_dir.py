"""The run directory: where config, checkpoints and logs go, checked before any work starts."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rsdino.errors import ExitCode, RsdinoError

log = logging.getLogger("rsdino")


class OutputDirError(RsdinoError, ValueError):
    """The output directory cannot be used; the message says why and what to do."""

    exit_code = ExitCode.CHECKPOINT


@dataclass(frozen=True)
class OutputPaths:
    root: Path
    config: Path
    checkpoints: Path
    train_log: Path


def output_paths(root: Path) -> OutputPaths:
    """Where a run directory keeps each thing (no file system access)."""
    return OutputPaths(
        root=root,
        config=root / "config.yaml",
        checkpoints=root / "checkpoints",
        train_log=root / "train_log.jsonl",
    )


def prepare_output_dir(root: Path, archive_checkpoints: bool = False) -> OutputPaths:
    """Create the run directory; with ``archive_checkpoints`` set aside existing checkpoints.

    Starting fresh (``--no-resume``) in a directory that already holds checkpoints must neither
    resume from them nor overwrite them, so they are renamed to ``checkpoints.old-<time>``.
    """
    if root.exists() and not root.is_dir():
        raise OutputDirError(
            f"output directory '{root}' exists and is a file; pass a directory path "
            "with --output-dir"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create output directory '{root}': {exc.strerror}") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise OutputDirError(f"output directory '{root}' is not writable by this user")
    paths = output_paths(root)
    if archive_checkpoints and paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
        archive = root / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.checkpoints.rename(archive)
        log.warning("--no-resume: kept the existing checkpoints aside in %s", archive)
    return paths
