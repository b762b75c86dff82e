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


def prepare_output_dir(root: Path, archive_previous_run: bool = False) -> OutputPaths:
    """Create the run directory; with ``archive_previous_run`` set aside an earlier run in it.

    Starting fresh (``--no-resume``) in a directory that already holds checkpoints must neither
    resume from them nor overwrite them, so they are renamed to ``checkpoints.old-<time>``; its
    ``train_log.jsonl`` likewise becomes ``train_log.old-<time>.jsonl``, so the new run's log
    holds the new run alone.
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if archive_previous_run and paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
        archive = root / f"checkpoints.old-{stamp}"
        paths.checkpoints.rename(archive)
        log.warning("--no-resume: kept the existing checkpoints aside in %s", archive)
    if archive_previous_run and paths.train_log.exists():
        paths.train_log.rename(root / f"train_log.old-{stamp}.jsonl")
    return paths
