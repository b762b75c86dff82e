"""The training loop: data -> multi-crop -> masks -> SSL step -> EMA -> logs and checkpoints."""

from __future__ import annotations

import datetime
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, get_worker_info

from rsdino import __version__
from rsdino.config.loader import config_to_yaml
from rsdino.data.augment import MultiCropAugment
from rsdino.data.bands import S2_LAYOUTS, BandNormalizer
from rsdino.data.batch_share import BatchShare
from rsdino.data.build import SourceSpec, build_dataset, cloudy_left_out, cloudy_marked
from rsdino.data.masking import IBotMasks, sample_ibot_masks
from rsdino.data.modality_dropout import sample_modality_presence
from rsdino.data.sampler import ResumableShuffleSampler
from rsdino.data.stats import normalizer_stats
from rsdino.data.stream import ShardStream
from rsdino.data.worker_stats import (
    WORKER_STATS_KEY,
    collate_with_worker_stats,
    init_loader_worker,
    merge_worker_findings,
    raise_worker_error,
)
from rsdino.errors import ExitCode, RsdinoError
from rsdino.models.build import describe_encoders, modalities
from rsdino.ssl.meta_arch import N_GLOBAL_CROPS, SSLBatch, SSLMetaArch
from rsdino.ssl.param_groups import apply_optim_schedule, build_param_groups
from rsdino.ssl.schedules import Schedules, build_schedules
from rsdino.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointInfo,
    SaveOutcome,
    model_and_optimizer_state,
    open_checkpoint_store,
)
from rsdino.train.curves import CurveWriters
from rsdino.train.dist import DistContext, barrier, init_distributed, shutdown_distributed
from rsdino.train.divergence import DivergenceGuard
from rsdino.train.fsdp import reshard_teacher, shard_model
from rsdino.train.metrics import (
    DisabledMetrics,
    TrainingMetrics,
    estimate_step_cost,
    start_metrics,
)
from rsdino.train.output_dir import output_paths, prepare_output_dir
from rsdino.train.periodic_eval import PeriodicKnn
from rsdino.train.preemption import StopSignal, TrainingInterrupted, ignore_stop_signals
from rsdino.train.progress import ProgressReporter
from rsdino.train.run_manifest import config_changes
from rsdino.train.runtime import (
    autocast,
    resolve_compile,
    resolve_device,
    resolve_precision,
    resolve_reduce_precision,
    step_generator,
    step_seed,
)

log = logging.getLogger("rsdino")


class TrainingDivergedError(RsdinoError, RuntimeError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""

    exit_code = ExitCode.DIVERGED


@dataclass
class TrainResult:
    final_step: int
    resumed_from: int | None
    last_checkpoint: str | None  # location of the newest complete checkpoint
    history: list[dict] = field(default_factory=list)


def total_steps(cfg: DictConfig) -> int:
    return cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH


def make_schedules(cfg: DictConfig, world_size: int = 1) -> Schedules:
    """DINOv2's schedules for this run's global batch (per-GPU batch x ranks)."""
    return build_schedules(
        OmegaConf.to_object(cfg.optim),
        OmegaConf.to_object(cfg.teacher),
        epoch_length=cfg.train.OFFICIAL_EPOCH_LENGTH,
        global_batch=cfg.train.batch_size_per_gpu * world_size,
    )


def make_optimizer(cfg: DictConfig, model: SSLMetaArch) -> torch.optim.AdamW:
    groups = build_param_groups(
        model.student,
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
    )
    for group in groups:
        group.pop("names", None)
    betas = (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2)
    return torch.optim.AdamW(groups, betas=betas, **_adamw_kernel(model))


def _adamw_kernel(model: SSLMetaArch) -> dict[str, bool]:
    """One fused kernel per step on CUDA, the multi-tensor (foreach) update elsewhere.

    Both compute the same update (``tests/test_fast_step.py``); fused only saves launches.
    FSDP2's DTensor parameters report their local device, so sharded CUDA runs fuse too.
    """
    on_cuda = next(model.student.parameters()).device.type == "cuda"
    return {"fused": True} if on_cuda else {"foreach": True}


def make_augment(cfg: DictConfig) -> MultiCropAugment:
    return MultiCropAugment(OmegaConf.to_object(cfg.crops), OmegaConf.to_object(cfg.augment))


def _init_loader_worker(worker_id: int) -> None:
    # A signal sent to the whole process group must not kill the workers mid-batch: the
    # training process handles it and shuts them down after its checkpoint.
    ignore_stop_signals()
    init_loader_worker(get_worker_info().dataset)


def make_loader(cfg: DictConfig, start_position: int, ctx: DistContext) -> DataLoader:
    """This rank's share of each global batch, from global sample position ``start_position``."""
    batch_size, workers = cfg.train.batch_size_per_gpu, cfg.train.num_workers
    loader_options = {
        "num_workers": workers,
        "pin_memory": ctx.device.type == "cuda",
        "persistent_workers": workers > 0,
        "prefetch_factor": 4 if workers > 0 else None,
        "worker_init_fn": _init_loader_worker if workers > 0 else None,
    }
    if cfg.train.dataset.source == "shards":
        stream = open_shard_stream(cfg, start_position, ctx)
        return DataLoader(stream, batch_size=None, **loader_options)
    dataset = build_dataset(cfg)
    sampler = ResumableShuffleSampler(
        len(dataset),
        seed=cfg.train.seed,
        start_position=start_position,
        share=rank_share(cfg, ctx),
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_with_worker_stats,
        drop_last=True,
        **loader_options,
    )


def describe_data(cfg: DictConfig, dataset: object) -> str:
    """Which data a run reads, for the start line: source, location, split and sample count."""
    spec = cfg.train.dataset
    count = dataset.manifest["total_samples"] if isinstance(dataset, ShardStream) else len(dataset)
    if spec.source == "synthetic":
        where = "built-in synthetic tiles"
    else:
        where = f"{spec.source} at {spec.uri}"
    split = f", split {spec.split}" if spec.source in ("sen12ms", "satlas") else ""
    clouds = ""
    if cfg.train.clouds.max_fraction < 1:
        if cfg.train.clouds.policy == "sar_only":
            acted = f"{cloudy_marked(dataset)} shown to the student as SAR only"
        elif cfg.train.clouds.policy == "weight":
            acted = f"{cloudy_marked(dataset)} with loss weight {cfg.train.clouds.loss_weight}"
        else:
            acted = f"{cloudy_left_out(dataset)} acquisitions left out"
        clouds = f" ({acted}: cloud fraction > {cfg.train.clouds.max_fraction})"
    seasonal = cfg.train.views.seasonal
    views = ""
    if seasonal.enabled and isinstance(dataset, ShardStream):
        views = (
            f"; seasonal views packed {seasonal.min_days_apart}-{seasonal.max_days_apart} "
            "days apart"
        )
    elif seasonal.enabled:
        paired = getattr(dataset, "source", dataset).samples_with_second_date
        views = (
            f"; seasonal views: {paired} of {count} samples have a second date "
            f"{seasonal.min_days_apart}-{seasonal.max_days_apart} days away"
        )
    return f"{where}{split}: {count} samples{clouds}{views}"


def open_shard_stream(cfg: DictConfig, start_position: int, ctx: DistContext) -> ShardStream:
    """Packed shards (``rsdino data pack``), checked against the configured band layout."""
    seasonal = cfg.train.views.seasonal
    stream = ShardStream(
        SourceSpec.from_config(
            OmegaConf.to_object(cfg.train.dataset),
            OmegaConf.to_object(cfg.train.storage),
            multimodal=cfg.train.multimodal,
        ).open_store(),
        share=rank_share(cfg, ctx),
        seed=cfg.train.seed,
        start_position=start_position,
        modalities=modalities(cfg),
        seasonal=(seasonal.min_days_apart, seasonal.max_days_apart) if seasonal.enabled else None,
    )
    layout = cfg.train.dataset.s2_layout
    packed_bands = stream.manifest.get("band_layout", {}).get("s2")
    if packed_bands is not None and list(packed_bands) != list(S2_LAYOUTS[layout]):
        raise RsdinoError(
            f"the shards at {cfg.train.dataset.uri} hold S2 bands {packed_bands}, not the "
            f"{layout} layout; set train.dataset.s2_layout to match"
        )
    return stream


def sample_masks(
    cfg: DictConfig, n_images: int, generator: torch.Generator, rows: Tensor
) -> IBotMasks | None:
    """iBOT masks of this rank's ``rows`` of a global batch's global crops (on the CPU)."""
    if cfg.ibot.loss_weight <= 0:
        return None
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return sample_ibot_masks(
        n_images,
        (grid, grid),
        tuple(cfg.ibot.mask_ratio_min_max),
        cfg.ibot.mask_sample_probability,
        generator,
        rows,
    )


def rank_share(cfg: DictConfig, ctx: DistContext) -> BatchShare:
    """This rank's rows of every global batch, for the data and for every per-sample draw."""
    return BatchShare(cfg.train.batch_size_per_gpu, ctx.rank, ctx.world_size)


def _clip_gradients(model: SSLMetaArch, max_norm: float) -> None:
    """Clip each student module (backbone, heads) on its own, as DINOv2 does."""
    if max_norm <= 0:
        return
    for module in model.student.values():
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def _check_finite(
    losses: dict[str, float], first_step: int, last_step: int, good: tuple[int, str] | None
) -> None:
    """Stop on a NaN/inf loss, naming the newest checkpoint saved while the loss was healthy."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if not bad:
        return
    where = (
        f"at step {last_step}"
        if first_step == last_step
        else f"between steps {first_step} and {last_step}"
    )
    if good is None:
        keep = "no checkpoint was saved while the loss was healthy; start over with --no-resume"
    else:
        keep = (
            f"the last good checkpoint (saved before any loss spike) is {good[1]}; rerun with "
            f"--resume-from-step {good[0]} (later checkpoints are kept aside)"
        )
    raise TrainingDivergedError(
        f"loss became non-finite {where} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
        f"training stopped without saving, {keep}. Lower optim.base_lr or optim.clip_grad, "
        "or check the input data."
    )


class Trainer:
    """One run: builds model, optimiser, data and schedules once; ``run`` steps until the end."""

    def __init__(
        self,
        cfg: DictConfig,
        output_dir: Path,
        resume: bool = True,
        preset: str | None = None,
        resume_from_step: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.preset = preset or "default"
        self.ctx = init_distributed(
            resolve_device(cfg.train.device),
            datetime.timedelta(seconds=cfg.train.collective_timeout_s),
        )
        self.device = self.ctx.device
        if self.ctx.is_main:
            self.paths = prepare_output_dir(output_dir, archive_previous_run=not resume)
        barrier()  # the directory exists (and old checkpoints are set aside) for every rank
        self.paths = output_paths(output_dir)
        self.amp_dtype = resolve_precision(cfg.train.precision, self.device)
        self.seed = cfg.train.seed
        self.share = rank_share(cfg, self.ctx)
        self.total_steps = total_steps(cfg)

        torch.manual_seed(self.seed)  # the initial weights, identical on every rank
        self.model = SSLMetaArch(cfg).to(self.device)
        if resolve_compile(cfg.train.compile, self.device):
            self.model.compile_blocks()  # before sharding, so FSDP2 wraps the compiled blocks
        if self.ctx.distributed:
            reduce_dtype = resolve_reduce_precision(cfg.train.reduce_precision)
            shard_model(self.model, self.amp_dtype, reduce_dtype)
        self.optimizer = make_optimizer(cfg, self.model)
        self.schedules = make_schedules(cfg, self.ctx.world_size)
        layout = cfg.train.dataset.s2_layout
        self.modalities = modalities(cfg)
        stats_file = cfg.train.dataset.stats or None
        self.normalizers = {
            name: BandNormalizer(
                *normalizer_stats(stats_file, name, layout, list(cfg.train.dataset.bands))
            ).to(self.device)
            for name in self.modalities
        }
        self.uses_time = cfg.student.temporal_embedding
        self.augment = make_augment(cfg)
        self.evaluation = PeriodicKnn(cfg, self.ctx, self.normalizers, self.total_steps)
        self.checkpointer = self._make_checkpointer(resume)
        self.divergence = DivergenceGuard(cfg.train.loss_spike_factor)
        self.start_step: int = 0
        self.last_checkpoint: str | None = None
        self.samples_seen = 0  # global sample position: where the data stream resumes
        if resume:
            self._restore(resume_from_step)
        if self.ctx.is_main:  # only a start that got this far replaces the run's config.yaml
            self.paths.config.write_text(config_to_yaml(cfg))

    def _make_checkpointer(self, resume: bool) -> Checkpointer:
        store = open_checkpoint_store(
            OmegaConf.to_object(self.cfg.checkpoint),
            OmegaConf.to_object(self.cfg.train.storage),
            self.paths.root,
        )
        if not resume and self.cfg.checkpoint.dir and store.complete_steps():
            raise RsdinoError(
                f"--no-resume, but checkpoint.dir={self.cfg.checkpoint.dir} already holds "
                "checkpoints, which a fresh run would overwrite; point checkpoint.dir at a new "
                "location (nothing was changed)"
            )
        return Checkpointer(
            store,
            keep=self.cfg.checkpoint.keep,
            async_save=self.cfg.checkpoint.async_save,
            is_main=self.ctx.is_main,
            # Async saves run collectives from a background thread: they get their own gloo
            # group, so they never interleave with the training step's collectives.
            process_group=dist.new_group(backend="gloo") if self.ctx.distributed else None,
            pinned_staging=self.device.type == "cuda",
        )

    def _check_resumable(self, info: CheckpointInfo) -> None:
        """Refuse a checkpoint written for another model; log the settings that changed."""
        location = self.checkpointer.store.location(info.step)
        shaping, other = config_changes(info.config, self.cfg)
        if shaping:
            raise CheckpointError(
                f"the config changed since {location} was saved: {'; '.join(shaping)}. These "
                "keys shape the model, so its weights cannot load; use the saved values, "
                "--no-resume, or a new --output-dir (nothing was changed)"
            )
        if other and self.ctx.is_main:
            log.info("resuming with changed settings: %s", "; ".join(other))

    def _restore(self, only_step: int | None) -> None:
        started = time.perf_counter()
        if only_step is not None:
            if self.ctx.is_main:
                aside = self.checkpointer.store.set_aside_after(only_step)
                if aside is not None:
                    log.warning(
                        "--resume-from-step %d: kept the later checkpoints aside in %s",
                        only_step,
                        aside,
                    )
            barrier()
        info = self.checkpointer.load_latest(
            self.model, self.optimizer, check=self._check_resumable, only_step=only_step
        )
        if info is None:
            return
        self.start_step, self.samples_seen = info.step, info.samples_seen
        self.last_checkpoint = self.checkpointer.store.location(info.step)
        self.divergence.good_step = self.checkpointer.protected_step = info.step
        log.info(
            "resumed from %s (step %d, saved by %d ranks, now %d) in %.1fs",
            self.last_checkpoint,
            info.step,
            info.world_size,
            self.ctx.world_size,
            time.perf_counter() - started,
        )

    def make_views(self, batch: dict, step: int) -> SSLBatch:
        """Normalise, multi-crop, mask and drop modalities with the step's own random stream."""
        cfg, device = self.cfg, self.device
        generator = step_generator(self.seed, step)
        images = {
            name: normalizer(batch[name].to(device, non_blocking=True))
            for name, normalizer in self.normalizers.items()
        }
        # Random draws are made for the whole global batch and sliced, so each sample gets the
        # same crops, masks and dropped modalities whatever the number of ranks.
        share = self.share
        seasonal = "s2_b" in batch  # train.views.seasonal: a second date of every sample
        second = (
            {
                name: normalizer(batch[f"{name}_b"].to(device, non_blocking=True))
                for name, normalizer in self.normalizers.items()
            }
            if seasonal
            else None
        )
        crops = self.augment(
            images,
            generator,
            share=share,
            second=second,
            locals_from_either=cfg.train.views.seasonal.locals == "any",
        )
        n_local = cfg.crops.local_crops_number
        global_rows, local_rows = share.view_rows(N_GLOBAL_CROPS), share.view_rows(n_local)
        masks = sample_masks(cfg, N_GLOBAL_CROPS * share.global_batch, generator, global_rows)
        if masks is not None:
            masks = masks.to(device)
        from_second = crops.get("local_from_second")

        def per_view(name: str) -> tuple[Tensor, Tensor | None]:
            """A per-sample field for each global and local view (crop-major), taken from the
            view's date: the second global crop and, where drawn, local crops are the 2nd date."""
            first = batch[name]
            second = batch.get(f"{name}_b", first)
            local = first.repeat(n_local) if n_local else None
            if local is not None and from_second is not None:
                local = torch.where(from_second, second.repeat(n_local), local)
            return torch.cat([first, second]), local

        global_doy = local_doy = None
        if self.uses_time:
            global_doy, local_doy = per_view("doy")
            global_doy = global_doy.to(device, non_blocking=True)
            local_doy = None if local_doy is None else local_doy.to(device, non_blocking=True)

        def presence(n_views: int, rows: Tensor, clear: Tensor | None) -> dict[str, Tensor] | None:
            present = sample_modality_presence(
                n_views * share.global_batch,
                self.modalities,
                cfg.train.modality_dropout,
                generator,
            )
            if present is None and clear is None:
                return None
            if present is None:
                present = {
                    name: torch.ones(len(rows), dtype=torch.bool) for name in self.modalities
                }
            else:
                present = {name: flags[rows] for name, flags in present.items()}
            if clear is not None:  # train.clouds.policy=sar_only: a cloudy view shows S1 alone
                present["s2"] = present["s2"] & clear
                present["s1"] = present["s1"] | ~clear  # never neither modality
            return {name: flags.to(device) for name, flags in present.items()}

        global_clear = local_clear = None  # per student view: its date is not cloudy
        if "cloudy" in batch:
            global_cloudy, local_cloudy = per_view("cloudy")
            global_clear = ~global_cloudy.bool()
            local_clear = None if local_cloudy is None else ~local_cloudy.bool()

        clouds = cfg.train.clouds
        show_sar_only = clouds.policy == "sar_only"

        def weight(clear: Tensor | None) -> Tensor | None:
            """train.clouds.policy=weight: a cloudy view's loss terms scaled by loss_weight."""
            if clear is None or clouds.policy != "weight":
                return None
            return torch.where(clear, 1.0, clouds.loss_weight).to(device)

        return SSLBatch(
            global_crops=crops["global_crops"],
            local_crops=crops["local_crops"] if n_local else None,
            masks=masks,
            global_doy=global_doy,
            local_doy=local_doy,
            global_present=presence(
                N_GLOBAL_CROPS, global_rows, global_clear if show_sar_only else None
            ),
            local_present=(
                presence(n_local, local_rows, local_clear if show_sar_only else None)
                if n_local
                else None
            ),
            global_weight=weight(global_clear),
            local_weight=weight(local_clear),
        )

    def train_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """One optimisation step on a loader batch; returns the loss parts and their total."""
        return self.optimise(self.make_views(batch, step), step)

    def optimise(self, views: SSLBatch, step: int) -> dict[str, Tensor]:
        """Forward, backward and update on a step's views (``make_views``); benchmarks time this
        part alone. Stochastic depth draws from the step's own seed, so a resume is exact."""
        torch.manual_seed(step_seed(self.seed, step))
        schedules = self.schedules
        apply_optim_schedule(
            self.optimizer,
            lr=schedules.lr[step],
            wd=schedules.wd[step],
            last_layer_lr=schedules.last_layer_lr[step],
        )
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype):
            total, parts = self.model.compute_losses(views, schedules.teacher_temp[step])
        total.backward()
        _clip_gradients(self.model, self.cfg.optim.clip_grad)
        self.optimizer.step()
        if self.ctx.distributed:
            reshard_teacher(self.model)
        self.model.update_teacher(schedules.momentum[step])
        return {**parts, "total": total.detach()}

    def save(self, step: int) -> list[SaveOutcome]:
        """Start a checkpoint of this step (every rank); returns the saves that ended meanwhile
        (the one in flight before, and this one when saving synchronously)."""
        info = CheckpointInfo(
            step=step,
            samples_seen=self.samples_seen,
            world_size=self.ctx.world_size,
            config=config_to_yaml(self.cfg),
            rsdino_version=__version__,
        )
        return self.checkpointer.save(model_and_optimizer_state(self.model, self.optimizer), info)

    def _stop_after_checkpoint(
        self, step: int, signum: int, metrics: TrainingMetrics | DisabledMetrics
    ) -> None:
        """A stop signal: the checkpoint of ``step`` is under way; finish it, then stop."""
        self._ended(self.checkpointer.wait(), metrics)
        saved = self.last_checkpoint == self.checkpointer.store.location(step)
        raise TrainingInterrupted(
            f"stopped on {signal.Signals(signum).name} after step {step}; "
            + (
                f"checkpoint {self.last_checkpoint} is complete, rerun to resume from it"
                if saved
                else f"its checkpoint failed, a rerun resumes from {self.last_checkpoint}"
            ),
            signum,
        )

    def _ended(
        self, outcome: SaveOutcome | None, metrics: TrainingMetrics | DisabledMetrics
    ) -> None:
        if outcome is None:
            return
        metrics.observe_checkpoint(outcome.step, outcome.seconds, outcome.committed)
        if outcome.committed:
            self.last_checkpoint = outcome.location
            self.divergence.committed(outcome.step)
            self.checkpointer.protected_step = self.divergence.good_step

    def _good_checkpoint(self) -> tuple[int, str] | None:
        step = self.divergence.good_step
        return None if step is None else (step, self.checkpointer.store.location(step))

    def _evaluate(
        self, step: int, reporter: ProgressReporter, metrics: TrainingMetrics | DisabledMetrics
    ) -> None:
        """kNN of the teacher on the held-out set (every rank extracts, rank 0 reports)."""
        result = self.evaluation.run(self.model.teacher["encoder"], step, self.amp_dtype)
        if self.ctx.distributed:
            reshard_teacher(self.model)
        if result is not None:
            reporter.report_eval(result.record(), result.seconds)
            metrics.observe_eval(step, result.accuracy)

    def _view_stats(self, batch: dict) -> dict[str, Tensor]:
        """Seasonal views: this step's share of two-date samples and their mean days apart
        (summed like the losses, so the interval figures are means over steps and ranks)."""
        if "days_apart" not in batch:
            return {}
        days = batch["days_apart"].to(self.device).float()
        return {"seasonal_pairs": (days > 0).float().mean(), "seasonal_days": days.mean()}

    def _scalars(self, step: int) -> dict[str, float]:
        s = self.schedules
        return {
            "lr": s.lr[step],
            "wd": s.wd[step],
            "momentum": s.momentum[step],
            "teacher_temp": s.teacher_temp[step],
        }

    def run(self) -> TrainResult:
        """Train to the last step, or to a checkpoint at the next interval after SIGTERM/SIGINT.

        The stop handlers are installed here, not at start-up: until the loop runs there is
        nothing to save, and a process blocked in the rendezvous or a checkpoint load must still
        die at once when torchrun restarts its group (a Python handler cannot run until the
        blocking call returns).
        """
        cfg, steps = self.cfg, self.total_steps
        result = TrainResult(
            final_step=self.start_step,
            resumed_from=self.start_step if self.last_checkpoint else None,
            last_checkpoint=self.last_checkpoint,
        )
        log.info(
            "training %s on %s (%s) x %d ranks for %d steps, batch %d per rank, output %s",
            describe_encoders(OmegaConf.to_object(cfg.student), multimodal=cfg.train.multimodal),
            self.device,
            "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
            self.ctx.world_size,
            steps,
            self.share.batch_size,
            self.paths.root,
        )
        if self.start_step >= steps:
            log.info("nothing to do: step %d already reached", self.start_step)
            return result

        self.model.train()
        reporter = ProgressReporter(self.paths.train_log, steps, self.share.global_batch)
        reporter.start(self.start_step)
        if self.ctx.is_main:
            reporter.drop_records_after(self.start_step)
        disabled_curves = CurveWriters(cfg, self.paths.root, enabled=False)
        run = _RunState(result, reporter, disabled_curves, window_start=self.start_step)
        stop = StopSignal()
        stop.install()
        try:
            self._open_data_and_metrics(run)
            for step in range(self.start_step, steps):
                done = self._step(run, step)
                is_ckpt_step = done % cfg.checkpoint.every_steps == 0 or done == steps
                stopping = None
                if is_ckpt_step or done % cfg.train.log_every_steps == 0:
                    self._log_interval(run, step)
                    # With the interval's all-reduces: whether any rank got SIGTERM.
                    stopping = stop.on_any_rank(self.device)
                if self.evaluation.due(done):
                    self._evaluate(done, reporter, run.metrics)
                if is_ckpt_step or stopping is not None:
                    self._checkpoint(run, done)
                else:
                    self._ended(self.checkpointer.poll(), run.metrics)
                result.final_step = done
                if stopping is not None:
                    self._stop_after_checkpoint(done, stopping, run.metrics)
            self._ended(self.checkpointer.wait(), run.metrics)
        finally:
            # Drop every reference to the loader's iterator, which stops its worker processes
            # (persistent workers live as long as the loader).
            run.batches = run.loader = None
            stop.restore()
            run.metrics.close()
            run.curves.close()
        result.last_checkpoint = self.last_checkpoint
        return result

    def _open_data_and_metrics(self, run: _RunState) -> None:
        """The loader, then the exporter and curve writers (in that order, see below)."""
        cfg = self.cfg
        run.loader = make_loader(cfg, self.samples_seen, self.ctx)
        # Forks the loader workers before the metrics socket exists: a worker that inherited
        # it would hold the port after this process died.
        run.batches = iter(run.loader)
        if self.ctx.is_main:
            log.info("data: %s", describe_data(cfg, run.loader.dataset))
        run.metrics = start_metrics(
            cfg, self.ctx, self.preset, estimate_step_cost(cfg, self.model.student)
        )
        run.curves = CurveWriters(cfg, self.paths.root, enabled=self.ctx.is_main)
        run.metrics.set_resumed_from(self.start_step)
        run.metrics.watch_data(run.loader.dataset)
        run.clouds = cloud_counts(cfg, run.loader.dataset)  # in every train_log.jsonl record

    def _step(self, run: _RunState, step: int) -> int:
        """Wait for the next batch, train on it and add its losses to the interval's sums."""
        started = time.perf_counter()
        batch = next(run.batches)
        raise_worker_error(batch)
        data_wait = time.perf_counter() - started
        if WORKER_STATS_KEY in batch:
            worker_id, stats = batch.pop(WORKER_STATS_KEY)
            merge_worker_findings(run.loader.dataset, stats["findings"])
            run.metrics.observe_worker_stats(worker_id, stats)
        step_values = {**self.train_step(batch, step), **self._view_stats(batch)}
        for name, value in step_values.items():
            run.running[name] = run.running.get(name, 0.0) + value
        self.samples_seen += self.share.global_batch
        done = step + 1
        run.metrics.observe_step(
            done, self.share.batch_size, data_wait, time.perf_counter() - started
        )
        return done

    def _log_interval(self, run: _RunState, step: int) -> None:
        """Interval means over the ranks (the loop's only host sync), then the divergence check,
        the metrics, ``train_log.jsonl`` and the curves."""
        done = step + 1
        losses = mean_over_ranks(run.running, done - run.window_start)
        views = seasonal_summary(losses)  # takes its entries out of the losses
        scalars = self._scalars(step)
        run.metrics.observe_interval(losses, scalars)
        if views:
            run.metrics.observe_views(views)
        self.divergence.observe(done, losses["total"])
        if not all(math.isfinite(value) for value in losses.values()):
            # A save still in flight may hold the last good weights: commit it first.
            self._ended(self.checkpointer.wait(), run.metrics)
        _check_finite(losses, run.window_start + 1, done, self._good_checkpoint())
        run.window_start, run.running = done, {}
        if self.ctx.is_main:
            record = run.reporter.report(done, losses, scalars, {**views, **run.clouds})
            run.result.history.append(record)
            run.curves.log(done, {**losses, **scalars, "samples_per_s": record["samples_per_s"]})

    def _checkpoint(self, run: _RunState, done: int) -> None:
        """Save step ``done``; the time the loop is held up is the checkpoint stall."""
        self.divergence.saving(done)
        started = time.perf_counter()
        for outcome in self.save(done):
            self._ended(outcome, run.metrics)
        run.metrics.observe_checkpoint_stall(time.perf_counter() - started)


@dataclass
class _RunState:
    """What one ``Trainer.run`` carries between its phases."""

    result: TrainResult
    reporter: ProgressReporter
    curves: CurveWriters
    window_start: int  # first step of the current logging interval
    running: dict[str, Tensor] = field(default_factory=dict)  # its per-step sums
    loader: DataLoader | None = None
    batches: Iterator[dict] | None = None
    metrics: TrainingMetrics | DisabledMetrics = field(default_factory=DisabledMetrics)
    clouds: dict[str, int] = field(default_factory=dict)


def cloud_counts(cfg: DictConfig, dataset: object) -> dict[str, int]:
    """The acquisitions train.clouds acted on: left out (drop) or kept and flagged."""
    if cfg.train.clouds.max_fraction >= 1:
        return {}
    if cfg.train.clouds.policy == "drop":
        return {"cloudy_left_out": cloudy_left_out(dataset)}
    return {"cloudy_kept": cloudy_marked(dataset)}


def seasonal_summary(means: dict[str, float]) -> dict[str, float]:
    """Move the seasonal-view statistics out of the interval means: the fraction of samples
    whose two global crops came from two dates, and the mean days between those dates."""
    if "seasonal_pairs" not in means:
        return {}
    pairs, days = means.pop("seasonal_pairs"), means.pop("seasonal_days")
    return {"seasonal_pairs": pairs, "seasonal_days_apart": days / pairs if pairs else 0.0}


def mean_over_ranks(running: dict[str, Tensor], n_steps: int) -> dict[str, float]:
    """Interval means of the loss parts, averaged over ranks (one small all-reduce)."""
    names = sorted(running)
    values = torch.stack([running[name] for name in names]).float() / n_steps
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(names, values.tolist(), strict=True))


def train(
    cfg: DictConfig,
    output_dir: Path,
    resume: bool = True,
    preset: str | None = None,
    resume_from_step: int | None = None,
) -> TrainResult:
    """Run (or resume) the pretraining described by ``cfg``; ``preset`` names it in metrics."""
    result = Trainer(cfg, output_dir, resume, preset, resume_from_step).run()
    # An explicit teardown on success: a process group left to interpreter exit can abort the
    # process (std::terminate in gloo's threads) after training has finished. On failure the
    # process exits without waiting for the other ranks, so torchrun notices and restarts them.
    shutdown_distributed()
    return result
