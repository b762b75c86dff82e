"""The base of every error a user can fix, and the exit codes the CLI and launcher return.

Exit codes say whether running the same command again can help. Schedulers act on that split:
Kubernetes' PyTorchJob ``restartPolicy: ExitCode`` recreates a pod for codes >= 128 and fails
the job for 1-127, and ``rsdino-torchrun`` stops restarting its workers on a permanent code.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What ``rsdino`` and ``rsdino-torchrun`` exit with; the README has the same table."""

    OK = 0
    # Permanent (1-127): rerunning the same command fails the same way.
    ERROR = 1  # any other error: a check with its message, or a bug (traceback)
    CONFIG = 2  # bad config key/value/file or command line
    DATA = 3  # bad data under train.dataset.on_error=fail, dataset missing or empty
    CHECKPOINT = 4  # checkpoints or the output directory cannot be used as they are
    DIVERGED = 5  # the loss became NaN/inf
    STORAGE = 6  # object store refuses: access denied, no such bucket or key
    # Retryable (>= 128): a restart resumes from the newest complete checkpoint.
    SIGINT = 130  # stopped on Ctrl-C / SIGINT after a checkpoint
    KILLED = 137  # SIGKILL (OOM killer, kubelet after the grace period): set by the kernel
    SIGTERM = 143  # stopped on SIGTERM (preemption, pod deletion) after a checkpoint
    UNAVAILABLE = 200  # a peer died, the rendezvous was lost, a collective timed out or the
    # object store stopped answering after every retry

    @staticmethod
    def is_permanent(code: int) -> bool:
        """Whether rerunning cannot help (1-127); signals and codes >= 128 are retryable."""
        return 0 < code < 128


class RsdinoError(Exception):
    """Raised with a message that names the thing at fault and what to do about it."""

    exit_code: int = ExitCode.ERROR
    label = "error"  # the word before the message, "rsdino: error: ...", or "" for none

    def __reduce__(self) -> tuple:
        # Pickled from a DataLoader worker to the training process, whatever the subclass's
        # __init__ takes: the message and attributes travel, not the constructor arguments.
        return (_restore_error, (type(self), str(self), self.__dict__))


def _restore_error(cls: type[RsdinoError], message: str, state: dict) -> RsdinoError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error
