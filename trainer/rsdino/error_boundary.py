"""Turn whatever ends a command into one line naming the thing and what to do, and an exit code.

Every ``rsdino`` subcommand runs inside :func:`run_reporting_errors`. A user-fixable error is one
line on stderr, never a traceback (``--debug`` adds it); the exit code follows
:class:`~rsdino.errors.ExitCode`, so schedulers can tell a retry from a permanent failure.
Only an unexpected exception, a bug, prints its traceback.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from rsdino.errors import ExitCode, RsdinoError

# Phrases of gloo/NCCL/TCPStore failures that torch raises as plain RuntimeError when a peer
# process dies or stops answering mid-collective.
_PEER_FAILURE_PHRASES = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out",
    "nccl",
    "gloo",
    "tcpstore",
    "socket",
)


def _peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says another rank or the rendezvous went away (retrying can help)."""
    if "torch.distributed" not in sys.modules:  # nothing distributed ran in this process
        return False
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError) or not dist.is_initialized():
        return False
    text = str(exc).lower()
    return any(phrase in text for phrase in _PEER_FAILURE_PHRASES)


def _os_error_line(exc: OSError) -> str:
    target = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name)
    reason = exc.strerror or str(exc)
    return f"{reason}: {target}" if target else reason


def run_reporting_errors(command: Callable[[], int], debug: bool = False) -> int:
    """Run ``command``; print one line for any failure and return its exit code."""

    def report(kind: str, message: str) -> None:
        if debug:
            traceback.print_exc()
        print(
            f"rsdino: {kind}: {message}" if kind else f"rsdino: {message}",
            file=sys.stderr,
            flush=True,
        )

    try:
        return command()
    except RsdinoError as exc:
        report(exc.label, str(exc))
        return int(exc.exit_code)
    except KeyboardInterrupt:
        report("interrupted", "stopped at once by Ctrl-C; no checkpoint was written")
        return int(ExitCode.SIGINT)
    except OSError as exc:
        report("error", f"{_os_error_line(exc)}; check the path and its permissions")
        return int(ExitCode.ERROR)
    except Exception as exc:
        if _peer_failure(exc):
            report(
                "distributed error",
                f"{exc}".splitlines()[0]
                + " (another rank or the rendezvous went away; a restart resumes from the "
                "newest complete checkpoint)",
            )
            return int(ExitCode.UNAVAILABLE)
        raise
