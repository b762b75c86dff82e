"""Single-process checkpoints that are either complete or invisible.

A checkpoint is written under a temporary name, flushed to disk, then renamed: the rename is
atomic on POSIX filesystems, so a crash mid-save leaves at most a stray temporary file, never a
broken ``step_*.pt``. Loading walks back from the newest file, so one unreadable checkpoint
costs the steps since the previous one, not the run.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsdino.errors import RsdinoError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8,})\.pt$")
REQUIRED_KEYS = ("step", "samples_seen", "model", "optimizer")


class CheckpointError(RsdinoError, RuntimeError):
    """No usable checkpoint could be read although some exist."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


class CheckpointManager:
    """Saves, lists, prunes and loads ``step_XXXXXXXX.pt`` files in one directory."""

    def __init__(self, directory: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = directory
        self.keep = keep

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / checkpoint_name(step)
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_directory()
        self._prune()
        return final

    def _fsync_directory(self) -> None:
        """Make the rename itself durable, so a power loss cannot resurrect the old state."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _prune(self) -> None:
        checkpoints = self.complete_checkpoints()
        for _, path in checkpoints[: -self.keep]:
            path.unlink(missing_ok=True)

    def load_latest(self) -> LoadedCheckpoint | None:
        """Newest readable checkpoint; unreadable ones are skipped with a warning (not deleted)."""
        checkpoints = self.complete_checkpoints()
        failures = []
        for step, path in reversed(checkpoints):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                missing = [key for key in REQUIRED_KEYS if key not in state]
                if missing:
                    raise ValueError(f"missing entries {missing}")
            except Exception as exc:  # any unreadable file: torch raises several types
                failures.append(f"{path.name}: {exc}")
                log.warning(
                    "checkpoint %s is unreadable (%s); falling back to the previous one. "
                    "The file is left in place for inspection.",
                    path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                continue
            return LoadedCheckpoint(path=path, step=step, state=state)
        if failures:
            raise CheckpointError(
                f"none of the {len(failures)} checkpoints in {self.directory} can be read "
                f"({'; '.join(failures)[:500]}). Move them away to start over, or pass "
                "--no-resume to start fresh (existing checkpoints are kept aside)."
            )
        return None
