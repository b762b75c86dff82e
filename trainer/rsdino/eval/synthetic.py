"""The synthetic land-cover world as labelled data: dominant class, classes present, class map.

Train, validation and test tiles are drawn after the ``index_offset`` a run trained on, so they
are never seen during pretraining, from the same world (seed) and so the same class signatures.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from rsdino.data.band_tables import MODALITIES
from rsdino.data.synthetic import SyntheticLandCover
from rsdino.eval.datasets import EvalDataError, LabelledSplits

TASKS = ("scene", "multilabel", "segmentation")


class SyntheticLabelled(Dataset):
    """Synthetic tiles with the target of ``task`` (and the day of year the tiles carry)."""

    def __init__(self, source: SyntheticLandCover, task: str, min_fraction: float) -> None:
        self.source = source
        self.task = task
        self.min_fraction = min_fraction

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        tile = self.source[index]
        sample = {"s1": tile["s1"], "s2": tile["s2"], "doy": tile["doy"], "key": tile["key"]}
        landcover = tile["landcover"]
        if self.task == "scene":
            sample["label"] = tile["label"]
        elif self.task == "multilabel":
            counts = np.bincount(landcover.ravel(), minlength=self.source.num_classes)
            sample["labels"] = (counts >= self.min_fraction * landcover.size).astype(np.float32)
        else:
            sample["mask"] = landcover.astype(np.int64)
        return sample


def synthetic_splits(
    task: str,
    *,
    counts: tuple[int, int, int] = (512, 128, 256),
    tile_size: int = 64,
    num_classes: int = 6,
    layout: str = "sen12ms",
    seed: int = 0,
    index_offset: int = 0,
    min_fraction: float = 0.05,
    texture_pairs: bool = False,
) -> LabelledSplits:
    """Disjoint train/val/test tiles from index ``index_offset`` on (e.g. after the training set).

    For "multilabel", a class counts as present when it covers ``min_fraction`` of the tile.
    """
    if task not in TASKS:
        raise EvalDataError(f"unknown synthetic task {task!r}; expected one of {TASKS}")
    if min(counts) < 1:
        raise EvalDataError(f"every synthetic split needs at least one tile, got {counts}")
    splits = []
    offset = index_offset
    for count in counts:
        source = SyntheticLandCover(
            count, tile_size, num_classes, layout, seed, offset, texture_pairs=texture_pairs
        )
        splits.append(SyntheticLabelled(source, task, min_fraction))
        offset += count
    return LabelledSplits(
        task=task,
        class_names=splits[0].source.class_names,
        train=splits[0],
        val=splits[1],
        test=splits[2],
        modalities=MODALITIES,
        # The paired world's name changes with its definition, so no cached feature of an
        # earlier definition (coarse grain 1/8, mixed tiles) is reused.
        identity=f"synthetic|{task}|{counts}|{tile_size}|{num_classes}|{layout}|{seed}|"
        f"{index_offset}|{min_fraction}" + ("|texture_pair_scenes" if texture_pairs else ""),
        ignore_index=None,
    )
