"""Sharded checkpoints that count only once complete, written while training goes on.

Layout under the checkpoint root (a local/NFS directory or ``s3://bucket/prefix``)::

    step_00001250/__0_0.distcp ...   one file per rank (torch.distributed.checkpoint)
    step_00001250/.metadata          DCP's index of every tensor shard
    step_00001250/rsdino-checkpoint.json   the commit marker, written last by rank 0

A directory without the marker is a save that failed or was killed: it is never loaded, and it
is deleted once a newer checkpoint is complete. Retention deletes the marker first, so a crash
mid-deletion cannot leave a checkpoint that looks complete but is not. DCP stores every tensor
with its global shape, so a checkpoint loads on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rsdino.data.source_config import StorageConfig
from rsdino.data.storage import LocalStore, StorageError, Store, open_store
from rsdino.errors import ExitCode, RsdinoError
from rsdino.train.checkpoint_config import CheckpointConfig
from rsdino.train.dcp_store import StoreReader, StoreWriter
from rsdino.train.output_dir import output_paths

log = logging.getLogger(__name__)
# DCP warns on every single-process save and load; running alone is intended here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

# DCP reports a failure on any rank as CheckpointException, a BaseException (not an Exception).
_SAVE_OR_LOAD_ERRORS = (Exception, CheckpointException)

MARKER = "rsdino-checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RsdinoError, RuntimeError):
    """No usable checkpoint could be read although some exist."""

    exit_code = ExitCode.CHECKPOINT


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """What the commit marker records besides the tensors."""

    step: int
    samples_seen: int
    world_size: int
    config: str
    rsdino_version: str

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "saved_at": time.time()}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> CheckpointInfo:
        fields = json.loads(text)
        return cls(**{name: fields[name] for name in cls.__dataclass_fields__})


class CheckpointStore:
    """The checkpoint root: which checkpoints are complete, their markers, retention."""

    def __init__(self, store: Store) -> None:
        self.store = store
        if isinstance(store, LocalStore):
            store.root.mkdir(parents=True, exist_ok=True)

    def location(self, step: int) -> str:
        return f"{self.store.uri.rstrip('/')}/{checkpoint_name(step)}"

    def _keys_by_step(self) -> dict[int, list[str]]:
        by_step: dict[int, list[str]] = {}
        for key in self.store.list("step_"):
            directory, _, _ = key.partition("/")
            match = _STEP_DIR.match(directory)
            if match:
                by_step.setdefault(int(match.group(1)), []).append(key)
        return by_step

    def _complete(self, by_step: dict[int, list[str]]) -> list[int]:
        return sorted(step for step, keys in by_step.items() if self._marker(step) in keys)

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return self._complete(self._keys_by_step())

    def _marker(self, step: int) -> str:
        return f"{checkpoint_name(step)}/{MARKER}"

    def read_info(self, step: int) -> CheckpointInfo:
        return CheckpointInfo.from_json(self.store.read(self._marker(step)).decode())

    def commit(self, info: CheckpointInfo) -> None:
        """Write the marker: from here on the checkpoint counts (call after DCP finished)."""
        self.store.write(self._marker(info.step), info.to_json().encode())

    def remove(self, step: int) -> None:
        """Delete one checkpoint, marker first."""
        self._delete(step, self._keys_by_step().get(step, []))

    def _delete(self, step: int, keys: list[str]) -> None:
        marker = self._marker(step)
        if marker in keys:
            self.store.delete(marker)
        for key in keys:
            if key != marker:
                self.store.delete(key)

    def select_complete(self, step: int | None = None, option: str = "--step") -> int:
        """The checkpoint to read: ``step``, or the newest complete one when ``step`` is None.

        Export, evaluation and ``--resume-from-step`` all pick a step here, so each fails the
        same way: naming the complete steps there are, and the ``option`` that asked.
        """
        steps = self.complete_steps()
        if step is None and not steps:
            raise CheckpointError(
                f"no complete checkpoint in {self.store.uri}; pass a run directory of "
                "`rsdino train` or its checkpoint.dir"
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(
                f"{option} {step}: {self.location(step)} is not a complete checkpoint; "
                f"complete ones are at steps {', '.join(map(str, steps)) or '(none)'}"
            )
        return step

    def set_aside_after(self, step: int) -> Path | None:
        """Move the checkpoints newer than ``step`` out of the way of a run resumed there (its
        saves would overwrite them, and a restart would resume from them); nothing is deleted.
        Returns where they went."""
        self.select_complete(step, "--resume-from-step")
        newer = [later for later in self._keys_by_step() if later > step]
        if not newer:
            return None
        if not isinstance(self.store, LocalStore):
            raise CheckpointError(
                f"--resume-from-step {step}: {self.store.uri} holds checkpoints of later steps "
                f"({', '.join(map(str, sorted(newer)))}) that the resumed run would overwrite; "
                "move them to another prefix first (e.g. aws s3 mv --recursive), nothing was "
                "changed"
            )
        root = self.store.root
        aside = root.with_name(f"{root.name}.after-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        aside.mkdir()
        for later in newer:
            (root / checkpoint_name(later)).rename(aside / checkpoint_name(later))
        return aside

    def prune(self, keep: int, protect: int | None = None) -> None:
        """Keep the newest ``keep`` complete checkpoints (and ``protect``); drop partial ones
        older than those."""
        by_step = self._keys_by_step()  # one listing for the whole pass
        complete = self._complete(by_step)
        doomed = [step for step in complete[:-keep] if step != protect]
        if complete:
            doomed += [step for step in by_step if step < complete[-1] and step not in complete]
        for step in doomed:
            self._delete(step, by_step[step])


def open_checkpoint_store(
    checkpoint: CheckpointConfig, storage: StorageConfig, output_dir: Path
) -> CheckpointStore:
    """``checkpoint.dir``, or the run directory's ``checkpoints/``; S3 as for the data
    (``train.storage``)."""
    store = open_store(
        checkpoint.dir or str(output_paths(output_dir).checkpoints),
        endpoint_url=storage.endpoint_url,
        region=storage.region,
        path_style=storage.path_style,
        max_attempts=storage.max_attempts,
    )
    return CheckpointStore(store)


def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The sharded state (DTensors under FSDP2) keyed by parameter names, as DCP expects."""
    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


@dataclass
class _PendingSave:
    info: CheckpointInfo
    future: Future
    started: float


@dataclass(frozen=True)
class SaveOutcome:
    """A save that ended: ``committed`` is False when it failed (and was reported)."""

    step: int
    location: str
    committed: bool
    seconds: float


class Checkpointer:
    """Saves (optionally in the background), commits, prunes and loads checkpoints.

    At most one save is in flight: a new save first finishes the previous one. Every rank calls
    every method; only rank 0 writes markers and deletes. A save that fails (storage down for
    longer than the retries cover) is logged and reported by :meth:`poll`/:meth:`wait` as not
    committed; training goes on and the next save tries again.
    """

    def __init__(
        self,
        store: CheckpointStore,
        keep: int,
        async_save: bool,
        is_main: bool,
        process_group: dist.ProcessGroup | None = None,
        pinned_staging: bool = False,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.store = store
        self.keep = keep
        self.async_save = async_save
        self.is_main = is_main
        self.process_group = process_group
        # One writer for the whole run: with pinned staging it reuses its host buffers.
        self._writer = StoreWriter(store.store, "", cache_staged_state_dict=pinned_staging)
        self._pending: _PendingSave | None = None
        self.protected_step: int | None = None  # retention keeps it besides the newest `keep`

    def save(self, state: dict[str, Any], info: CheckpointInfo) -> list[SaveOutcome]:
        """Start saving ``state`` as step ``info.step``; returns the saves that ended meanwhile.

        Those are the save still in flight, which ends first (at most one is in flight), and
        this save itself when saving synchronously; an asynchronous one ends in :meth:`poll` or
        :meth:`wait`.
        """
        previous = self.wait()
        ended = [] if previous is None else [previous]
        name = checkpoint_name(info.step)
        if self.is_main:
            self._remove_leftovers(info.step)
        started = time.perf_counter()
        kwargs = {
            "checkpoint_id": name,
            "storage_writer": self._writer,
            "process_group": self.process_group,
            "no_dist": not dist.is_initialized(),
        }
        if self.async_save:
            future = dcp.async_save(state, **kwargs)
        else:
            future = Future()
            try:
                future.set_result(dcp.save(state, **kwargs))
            except _SAVE_OR_LOAD_ERRORS as exc:  # reported like an async failure (_finish)
                future.set_exception(exc)
        self._pending = _PendingSave(info=info, future=future, started=started)
        if not self.async_save:
            ended.append(self._finish())
        return ended

    def _remove_leftovers(self, step: int) -> None:
        """Files of a killed attempt at this same step; if storage is down, the save reports it.

        Every rank must still enter the save (its collectives need all ranks), so a failure here
        is only logged.
        """
        try:
            self.store.remove(step)
        except StorageError as exc:
            log.warning("could not clear %s before saving: %s", self.store.location(step), exc)

    def poll(self) -> SaveOutcome | None:
        """Finish the save in flight if its writing is done; never blocks."""
        if self._pending is None or not self._pending.future.done():
            return None
        return self._finish()

    def wait(self) -> SaveOutcome | None:
        """Block until the save in flight (if any) is written and committed or failed."""
        if self._pending is None:
            return None
        return self._finish()

    def _finish(self) -> SaveOutcome:
        pending, self._pending = self._pending, None
        assert pending is not None
        step, location = pending.info.step, self.store.location(pending.info.step)
        try:
            pending.future.result()
            if self.is_main:
                self.store.commit(pending.info)
        except _SAVE_OR_LOAD_ERRORS as exc:  # storage or DCP failure: report, keep training
            message = (
                f"checkpoint {location} was not saved ({_first_line(exc)}); training goes on and "
                "the next checkpoint retries. The previous complete checkpoint is untouched."
            )
            # Every rank sees the same DCP failure; one report in the log is enough.
            log.log(logging.ERROR if self.is_main else logging.DEBUG, message)
            return SaveOutcome(step, location, False, time.perf_counter() - pending.started)
        seconds = time.perf_counter() - pending.started
        if self.is_main:
            log.info("checkpoint %s complete (%.2fs after the save began)", location, seconds)
            try:
                self.store.prune(self.keep, protect=self.protected_step)
            except StorageError as exc:  # the next commit prunes again
                log.warning("could not prune old checkpoints in %s: %s", self.store.store.uri, exc)
        return SaveOutcome(step, location, True, seconds)

    def load_latest(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        check: Callable[[CheckpointInfo], None] | None = None,
        only_step: int | None = None,
    ) -> CheckpointInfo | None:
        """Load the newest complete checkpoint that reads (or exactly ``only_step``); older ones
        are fallbacks.

        ``check`` sees each candidate's marker before its tensors are read and may refuse it
        with a ``CheckpointError`` (a config that builds another model), which ends the search.
        Every rank runs this; DCP shares any rank's read failure with all of them, so all ranks
        fall back together.
        """
        steps = self.store.complete_steps()
        if only_step is not None:
            steps = [self.store.select_complete(only_step, "--resume-from-step")]
        failures: list[str] = []
        for step in reversed(steps):
            location = self.store.location(step)
            try:
                info = self.store.read_info(step)
            except _SAVE_OR_LOAD_ERRORS as exc:
                failures.append(_report_unreadable(location, exc))
                continue
            if check is not None:
                check(info)
            try:
                state = model_and_optimizer_state(model, optimizer)
                dcp.load(
                    state,
                    storage_reader=StoreReader(self.store.store, checkpoint_name(step)),
                    process_group=self.process_group,
                    no_dist=not dist.is_initialized(),
                )
                set_model_state_dict(model, state["model"])
                set_optimizer_state_dict(model, optimizer, state["optimizer"])
            except _SAVE_OR_LOAD_ERRORS as exc:
                failures.append(_report_unreadable(location, exc))
                continue
            return info
        if failures:
            raise CheckpointError(
                f"none of the {len(failures)} complete checkpoints can be read "
                f"({'; '.join(failures)[:600]}). Move them away to start over, or pass "
                "--no-resume to start fresh."
            )
        return None


def _report_unreadable(location: str, exc: BaseException) -> str:
    """Warn that a checkpoint cannot be read (it is kept); returns the line for the summary."""
    log.warning(
        "checkpoint %s is unreadable (%s); falling back to the previous one. "
        "It is left in place for inspection.",
        location,
        _first_line(exc),
    )
    return f"{location}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    """One line naming the cause; DCP's CheckpointException wraps each failing rank's error."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (cause, _) = next(iter(sorted(exc.failures.items())))
        return f"rank {rank}: {_first_line(cause)}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_tensors(store: CheckpointStore, step: int, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (e.g. ``model.teacher.encoder.``), whole, in one process.

    For export and inspection: no model and no process group needed, whatever world size
    wrote the checkpoint.
    """
    reader = StoreReader(store.store, checkpoint_name(step))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{store.location(step)} holds no tensors under {prefix!r}")
    dcp.load(state, storage_reader=StoreReader(store.store, checkpoint_name(step)), no_dist=True)
    return {key.removeprefix(prefix): value for key, value in state.items()}
