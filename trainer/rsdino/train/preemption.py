"""Stop cleanly on SIGTERM, the notice that Kubernetes, Slurm and torchrun give before a kill.

Without a handler SIGTERM ends the process at once and the steps since the last checkpoint are
lost. With it, the loop finishes its step, every rank agrees to stop at the same step (one may
get the signal before the others), saves a checkpoint, waits for it to be complete and exits
with 143 (128 + SIGTERM), a failure, so that the job is restarted and resumes.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from rsdino.errors import RsdinoError

log = logging.getLogger(__name__)


class TrainingInterrupted(RsdinoError):
    """Training stopped on SIGTERM after saving a checkpoint; rerunning resumes from it."""

    exit_code = 128 + signal.SIGTERM


class StopSignal:
    """Once installed, SIGTERM sets a flag instead of ending the process (main thread only)."""

    def __init__(self) -> None:
        self.received = False
        self._previous: signal.Handlers | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            log.warning("SIGTERM received: saving a checkpoint at the next logging step, then exit")
        self.received = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_any_rank(self, device: torch.device) -> bool:
        """Whether any rank got SIGTERM (a collective: every rank calls it at the same step)."""
        flag = torch.tensor([float(self.received)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
