"""Process group setup for torchrun (single or multi node, elastic), Slurm ``srun`` or one process.

torchrun and the Kubeflow training operator export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; under
Slurm without torchrun the SLURM_* variables are translated. One process needs no group at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rsdino.errors import ExitCode, RsdinoError

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
# Set by rsdino-torchrun for its workers: the elastic rendezvous round they were started in.
RENDEZVOUS_ROUND_ENV = "RSDINO_RENDEZVOUS_ROUND"


class DistributedError(RsdinoError):
    """The process group could not be formed; a restart joins a new rendezvous."""

    exit_code = ExitCode.UNAVAILABLE


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def _slurm_to_torch_env() -> None:
    """Map ``srun``'s variables onto the ones torch reads, when torchrun did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise RsdinoError(
            "running under srun without torchrun: export MASTER_ADDR (the first node's host name) "
            "and MASTER_PORT in the sbatch script, see scripts/slurm/"
        )
    os.environ.setdefault("MASTER_PORT", "29500")


def _rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The TCP store of this attempt, under a prefix unique to the torchrun restart count.

    torchrun keeps one store across restarts of the worker group; without a fresh prefix the
    restarted ranks can read the dead attempt's gloo addresses and fail to connect. The prefix
    must be the same on every rank of one group: ``rsdino-torchrun`` exports the rendezvous
    round, which all agents share. torchrun's restart count is only a stand-in: it is counted per
    agent, so a recreated pod (count 0) and a surviving one (count 2) would disagree.
    """
    host = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not host or not port:
        raise RsdinoError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with "
            "torchrun, srun (scripts/slurm) or export them"
        )
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host,
        int(port),
        world_size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timeout,
        wait_for_workers=False,
    )
    attempt = os.environ.get(
        RENDEZVOUS_ROUND_ENV, os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    )
    return dist.PrefixStore(f"rsdino/attempt_{attempt}", store)


def init_distributed(
    device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistContext:
    """Join the process group described by the environment (or stay alone) on ``device``'s type."""
    _slurm_to_torch_env()
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend=backend,
                store=_rendezvous_store(rank, world_size, timeout),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"rank {rank} of {world_size} could not join the process group at "
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} "
                f"({backend}): {exc}. Check that every node can reach that address and that all "
                "ranks were started."
            ) from exc
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group once every rank is done with it."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
