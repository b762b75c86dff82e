"""Stop cleanly on SIGTERM or SIGINT: finish the step, save a checkpoint, exit for a restart.

SIGTERM is the notice that Kubernetes, Slurm, ``timeout`` and torchrun give before a kill;
SIGINT is Ctrl-C. Without a handler either ends the process at once and the steps since the last
checkpoint are lost. With it, the loop finishes its step, every rank agrees to stop at the same
step (one may get the signal before the others), saves a checkpoint, waits for it to be complete
and exits with 128 + the signal number (143, 130): a retryable failure, so that a scheduler
restarts the job and it resumes. A second Ctrl-C stops at once, without the checkpoint.

The signal may reach the training process only (Kubernetes signals the container's PID 1,
torchrun forwards it) or every process of the group, DataLoader workers included (Slurm,
``timeout``, ``kill -- -PGID``, a terminal's Ctrl-C). Loader workers therefore ignore both
signals (:func:`ignore_stop_signals`) and are shut down by the training process when it stops.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

from rsdino.errors import RsdinoError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RsdinoError):
    """Training stopped on a signal after saving a checkpoint; rerunning resumes from it."""

    label = ""  # the message says it all: "rsdino: stopped on SIGTERM after step ..."

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGINT to the training process."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    # multiprocessing's own exit hook terminates daemonic children with SIGTERM, which loader
    # workers ignore, then joins them forever. Workers still alive at exit (an error unwound
    # past their DataLoader) are killed here first; atexit runs this hook before that one.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


atexit.register(_kill_leftover_workers)


class StopSignal:
    """Once installed, SIGTERM/SIGINT set a flag instead of ending the process (main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, signal.Handlers] = {}

    @property
    def received(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: saving a checkpoint at the next logging step, then exit%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else "",
            )

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def on_any_rank(self, device: torch.device) -> int | None:
        """The signal any rank got, or None (a collective: every rank calls it at the same step).

        SIGTERM wins over SIGINT when ranks got different ones: it is the scheduler's notice.
        """
        flag = torch.tensor([float(self.signum or 0)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        return signum or None
