"""kNN of the teacher on held-out labelled data every ``evaluation.eval_period_iterations`` steps.

The labelled splits are opened once at start-up, so a wrong ``evaluation.uri`` fails before the
first step rather than hours in. Each rank extracts the features of its own contiguous block of
samples (blocks padded to equal length, so FSDP's all-gathers stay in lockstep); rank 0 gathers
them and votes. Extraction runs on a forked random state: turning evaluation on does not change
a single training draw, so resume stays exact.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from rsdino.data.bands import BandNormalizer
from rsdino.data.storage import open_store
from rsdino.eval.datasets import EUROSAT_BANDS, LabelledSplits, Subset, scene_splits
from rsdino.eval.features import extract_features, modes_of
from rsdino.eval.knn import knn_classify
from rsdino.eval.synthetic import synthetic_splits
from rsdino.train.dist import DistContext
from rsdino.train.runtime import autocast

log = logging.getLogger("rsdino")


@dataclass(frozen=True)
class KnnResult:
    """One periodic evaluation: top-1 accuracy per k on the query split."""

    step: int
    accuracy: dict[int, float]
    dataset: str
    mode: str
    bank_size: int
    query_size: int
    seconds: float

    def record(self) -> dict:
        """The line it adds to ``train_log.jsonl``."""
        return {
            "step": self.step,
            "eval": {
                "knn": {str(k): value for k, value in sorted(self.accuracy.items())},
                "dataset": self.dataset,
                "mode": self.mode,
                "bank": self.bank_size,
                "queries": self.query_size,
                "seconds": round(self.seconds, 3),
            },
        }


def labelled_splits(cfg: DictConfig) -> LabelledSplits:
    """Memory bank (train) and queries (val) the config names, in the run's band layout."""
    ev, layout = cfg.evaluation, cfg.train.dataset.s2_layout
    if ev.dataset == "synthetic":
        synthetic = cfg.train.synthetic
        bank, queries = ev.synthetic_counts
        return synthetic_splits(
            "scene",
            counts=(bank, queries, 1),
            tile_size=ev.tile_size or synthetic.tile_size,
            num_classes=synthetic.num_classes,
            layout=layout,
            seed=cfg.train.seed,
            index_offset=synthetic.num_samples,
            texture_pairs=synthetic.texture_pairs,
        )
    return scene_splits(
        open_store(ev.uri),
        layout=layout,
        file_bands=EUROSAT_BANDS,
        size=ev.tile_size or 64,
        split_dir=ev.split_dir or None,
        val_fraction=ev.val_fraction,
        test_fraction=0.0,
        seed=cfg.train.seed,
    )


def rank_block(n_samples: int, rank: int, world_size: int) -> list[int]:
    """This rank's contiguous block of ``range(n_samples)``, padded with the last index so every
    rank has ``ceil(n / world)`` samples; concatenated in rank order, the first ``n`` are exact."""
    per_rank = math.ceil(n_samples / world_size)
    start = rank * per_rank
    block = list(range(start, min(start + per_rank, n_samples)))
    return block + [n_samples - 1] * (per_rank - len(block))


class PeriodicKnn:
    """Decides when to evaluate and runs one kNN evaluation of the teacher encoder."""

    def __init__(
        self,
        cfg: DictConfig,
        ctx: DistContext,
        normalizers: dict[str, BandNormalizer],
        total_steps: int,
    ) -> None:
        ev = cfg.evaluation
        self.period = ev.eval_period_iterations
        self.total_steps = total_steps
        self.ks = tuple(ev.ks)
        self.temperature = ev.temperature
        self.batch_size = ev.batch_size
        self.ctx = ctx
        self.normalizers = normalizers
        self.uses_time = cfg.student.temporal_embedding
        self.splits = labelled_splits(cfg) if self.period > 0 else None

    def due(self, done: int) -> bool:
        return self.period > 0 and (done % self.period == 0 or done == self.total_steps)

    def run(self, encoder: nn.Module, step: int, amp_dtype: torch.dtype | None) -> KnnResult | None:
        """Every rank calls this; rank 0 gets the result, the others ``None``."""
        splits = self.splits
        assert splits is not None
        started = time.perf_counter()
        mode = modes_of(encoder, splits.modalities)[0]
        device = self.ctx.device
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), autocast(device, amp_dtype):
            bank = self._features(encoder, splits.train, mode, "train")
            queries = self._features(encoder, splits.val, mode, "val")
        if not self.ctx.is_main:
            return None
        num_classes = len(splits.class_names)
        accuracy = knn_classify(
            bank["cls"],
            bank["label"],
            queries["cls"],
            queries["label"],
            ks=self.ks,
            temperature=self.temperature,
            num_classes=num_classes,
        )
        return KnnResult(
            step=step,
            accuracy=accuracy,
            dataset=splits.identity.split("|", 1)[0],
            mode=mode,
            bank_size=len(bank["label"]),
            query_size=len(queries["label"]),
            seconds=time.perf_counter() - started,
        )

    def _features(
        self, encoder: nn.Module, dataset: object, mode: str, split: str
    ) -> dict[str, Tensor]:
        """[CLS] features and labels of the whole split, gathered from every rank's block."""
        ctx, n_samples = self.ctx, len(dataset)
        mine = Subset(dataset, rank_block(n_samples, ctx.rank, ctx.world_size))
        found = extract_features(
            encoder,
            mine,
            self.normalizers,
            mode=mode,
            batch_size=self.batch_size,
            device=ctx.device,
            label=f"eval {split}",
            use_time=self.uses_time,
            progress=False,
        )
        cls, labels = found["cls"], found["label"].long()
        if ctx.distributed:
            cls, labels = _gather(cls.to(ctx.device), ctx), _gather(labels.to(ctx.device), ctx)
        return {"cls": cls[:n_samples].cpu(), "label": labels[:n_samples].cpu()}


def _gather(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Every rank's equal-sized block, concatenated in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
