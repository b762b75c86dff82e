"""``rsdino-torchrun``: torchrun whose exit code says whether a restart can help.

Plain torchrun exits 1 with a traceback for nearly everything: a bad config, a lost peer, the
SIGTERM of a preemption. A scheduler that acts on exit codes (Kubernetes ``restartPolicy:
ExitCode``, Slurm requeue scripts) cannot tell them apart. This wrapper takes the same arguments
(and the ``PET_*`` variables the Kubeflow training operator injects) and

- stops restarting the worker group as soon as a worker exits with a permanent rsdino code
  (config, data, checkpoint, storage errors: every restart would fail the same way);
- exits with the workers' own code (the first failure's), 128 + N for a worker killed by signal
  N, 128 + N when the launcher itself got signal N (after its workers checkpointed), and
  :attr:`ExitCode.UNAVAILABLE` when the rendezvous or its store is lost;
- reports each of those as one line instead of a traceback;
- checks an ``rsdino train`` config before joining the rendezvous, so a bad config fails every
  pod with exit 2 on its own (not one pod with 2 and its peers with "store lost");
- works around a torch rendezvous stall (see :func:`_republish_store_address`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.distributed import DistError
from torch.distributed import run as torchrun
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import ProcessFailure, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import (
    RendezvousError,
    RendezvousInfo,
    RendezvousStoreInfo,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
from torch.distributed.launcher import api as launcher_api

from rsdino.errors import ExitCode
from rsdino.train.dist import RENDEZVOUS_ROUND_ENV

log = logging.getLogger("rsdino.launch")


def failure_exit_code(failure: ProcessFailure) -> int:
    """A worker's exit status as a shell would report it (128 + N when killed by signal N)."""
    return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode


def job_exit_code(failures: dict[int, ProcessFailure]) -> int:
    """The code of a failed worker group: a permanent code if any rank had one (it is the cause;
    the other ranks only lost their peer), else the first failure's."""
    by_time = sorted(failures.values(), key=lambda failure: failure.timestamp)
    codes = [failure_exit_code(failure) for failure in by_time]
    known = [code for code in codes if _known_permanent(code)]
    return known[0] if known else codes[0]


def _known_permanent(code: int) -> bool:
    """A permanent code rsdino chose on purpose; 1 may also be a crash caused by a lost peer."""
    return ExitCode.is_permanent(code) and code != ExitCode.ERROR


def _republish_store_address(handler: DynamicRendezvousHandler) -> RendezvousInfo:
    """``next_rendezvous``, plus rank 0 publishing the shared store's address in every round.

    With the shared TCP store (torch's default), rank 0 publishes MASTER_ADDR/MASTER_PORT under
    the round's key prefix only in the round where it first builds that info; an agent that stays
    rank 0 into a later round skips it. A pod that joins then (a replaced or added Kubernetes pod)
    waits for keys nobody writes until the store's read timeout (60 s) fails the round, and
    every agent restarts once more. Writing the same two keys again in each round removes that.

    The round number, the same on every agent of the round, is exported to the workers started
    next (they inherit this process's environment) as the prefix of their process-group keys.
    """
    info = _next_rendezvous(handler)
    os.environ[RENDEZVOUS_ROUND_ENV] = str(handler._state_holder.state.round)
    store_info = info.bootstrap_store_info
    if info.rank == 0 and store_info is not None:
        info.store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, store_info.master_addr.encode())
        info.store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(store_info.master_port).encode())
    return info


_next_rendezvous = DynamicRendezvousHandler.next_rendezvous


class _StopOnPermanentFailure(LocalElasticAgent):
    """torchrun's agent, minus the restarts that cannot help."""

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.is_failed():
            code = job_exit_code(result.failures)
            if _known_permanent(code):
                if self._remaining_restarts > 0:
                    log.error("a worker exited with permanent code %d: not restarting", code)
                self._remaining_restarts = 0
        return result


def rsdino_arguments(args: argparse.Namespace) -> list[str] | None:
    """The workers' ``rsdino`` command line when they run ``rsdino``, else None."""
    if args.module:
        runs_rsdino = args.training_script == "rsdino.cli"
    else:
        runs_rsdino = args.no_python and Path(args.training_script).name == "rsdino"
    return list(args.training_script_args) if runs_rsdino else None


def main(argv: Sequence[str] | None = None) -> int:
    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    rsdino_argv = rsdino_arguments(args)
    if rsdino_argv is not None:
        from rsdino.cli import check_train_config

        code = check_train_config(rsdino_argv)
        if code != 0:
            print(f"rsdino-torchrun: the config is invalid; exiting with {code}", file=sys.stderr)
            return code
    launcher_api.LocalElasticAgent = _StopOnPermanentFailure
    DynamicRendezvousHandler.next_rendezvous = _republish_store_address
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        code = job_exit_code(exc.failures)
        for rank, failure in sorted(exc.failures.items()):
            print(
                f"rsdino-torchrun: rank {rank} exited with {failure_exit_code(failure)}",
                file=sys.stderr,
            )
        print(f"rsdino-torchrun: exiting with {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:
        code = 128 + int(exc.sigval)
        print(
            f"rsdino-torchrun: stopped on {exc.sigval.name} after the workers finished; "
            f"exiting with {code}",
            file=sys.stderr,
            flush=True,
        )
        return code
    except (RendezvousError, DistError, ConnectionError, TimeoutError) as exc:
        print(
            f"rsdino-torchrun: rendezvous failed ({type(exc).__name__}: {exc}); a restart "
            "joins a new one",
            file=sys.stderr,
            flush=True,
        )
        return int(ExitCode.UNAVAILABLE)
    finally:
        launcher_api.LocalElasticAgent = LocalElasticAgent
        DynamicRendezvousHandler.next_rendezvous = _next_rendezvous
    return 0


if __name__ == "__main__":
    sys.exit(main())
