"""train.views.seasonal: the second global crop of a sample comes from another date of its patch."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    TINY_OVERRIDES,
    multicrop,
    saved_tensors,
    tiny_config,
    tiny_multimodal_config,
    torchrun_train_command,
)
from source_fixtures import SERIES_DATES, write_sen12ms_time_series

from rsdino.cli import main
from rsdino.config.loader import ConfigError, load_config
from rsdino.data.augment import MultiCropAugment
from rsdino.data.batch_share import BatchShare
from rsdino.data.build import build_dataset
from rsdino.data.seasonal import SeasonalViews
from rsdino.data.sources import Sen12MSSource, store_access
from rsdino.data.storage import open_store
from rsdino.data.stream import ShardStream
from rsdino.errors import RsdinoError
from rsdino.train.checkpoint import checkpoint_name
from rsdino.train.loop import Trainer, make_loader, train

WINDOW = ["train.views.seasonal.min_days_apart=30", "train.views.seasonal.max_days_apart=120"]
SEASONAL = ["train.views.seasonal.enabled=true", *WINDOW]


def _date(key: str) -> datetime.date:
    return datetime.date.fromisoformat(key.split("_")[-3])


def _sources(uri: Path) -> list[str]:
    return ["train.dataset.source=sen12ms", f"train.dataset.uri={uri}"]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("series") / "data"
    write_sen12ms_time_series(root)
    return root


def test_each_sample_gets_another_date_of_its_patch_within_the_window(series: Path) -> None:
    dataset = build_dataset(tiny_multimodal_config(*_sources(series), *SEASONAL))
    partners = []
    for index in range(len(dataset)):
        sample = dataset[index]
        first, second = sample["key"], sample["key_b"]
        assert first.split("/")[:2] == second.split("/")[:2]  # same ROI and tile
        assert first.rsplit("_patch_", 1)[1] == second.rsplit("_patch_", 1)[1]  # same patch
        days = abs((_date(second) - _date(first)).days)
        assert 30 <= days <= 120 and sample["days_apart"] == days
        # The pixels are the other date's: the fixture writes the time index into band 0.
        assert int(sample["s2_b"][0, 0, 0]) == SERIES_DATES.index(str(_date(second)))
        assert sample["s1_b"].shape == sample["s1"].shape
        assert sample["doy_b"] == _date(second).timetuple().tm_yday
        partners.append(second)
    again = build_dataset(tiny_multimodal_config(*_sources(series), *SEASONAL))
    assert [again[i]["key_b"] for i in range(len(again))] == partners  # a pure function
    other_seed = build_dataset(tiny_multimodal_config(*_sources(series), *SEASONAL, "train.seed=5"))
    assert [other_seed[i]["key_b"] for i in range(len(other_seed))] != partners


def test_a_sample_without_a_date_in_the_window_keeps_one_date(series: Path) -> None:
    far = ["train.views.seasonal.min_days_apart=400", "train.views.seasonal.max_days_apart=500"]
    dataset = build_dataset(
        tiny_config(*_sources(series), "train.views.seasonal.enabled=true", *far)
    )
    sample = dataset[0]
    assert sample["key_b"] == sample["key"] and sample["days_apart"] == 0
    assert dataset.source.samples_with_second_date == 0


def test_disabled_serves_single_dates_as_before(series: Path) -> None:
    sample = build_dataset(tiny_multimodal_config(*_sources(series)))[0]
    assert sorted(sample) == ["doy", "key", "label", "s1", "s2"]


def test_synthetic_tiles_come_back_later_in_the_season(tmp_path: Path) -> None:
    plain = build_dataset(tiny_multimodal_config())
    seasonal = build_dataset(tiny_multimodal_config(*SEASONAL))
    for index in range(8):
        first, both = plain[index], seasonal[index]
        for name in ("s1", "s2", "doy", "key", "label", "landcover"):  # the first date: today's
            assert np.array_equal(first[name], both[name]), name
        gap = both["days_apart"]
        assert 30 <= gap <= 120 and both["doy_b"] == (both["doy"] - 1 + gap) % 365 + 1
        assert both["s2_b"].shape == both["s2"].shape and not np.array_equal(
            both["s2_b"], both["s2"]
        )
    assert train(tiny_multimodal_config(*SEASONAL), tmp_path / "run").final_step == 6


def _images(batch: int, size: int, value: float) -> dict[str, torch.Tensor]:
    """S1 and S2 with the same spatial ramp (plus ``value``), so their crops can be compared."""
    ramp = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size) / size**2
    base = ramp.expand(batch, 1, size, size) + value
    return {"s1": base.repeat(1, 2, 1, 1), "s2": base.repeat(1, 13, 1, 1)}


def _plain_augment(local_crops_number: int = 2) -> MultiCropAugment:
    """Geometry only: no photometric jitter or blur, so crops are exact resamplings."""
    return multicrop(
        global_crops_size=8,
        local_crops_size=4,
        local_crops_number=local_crops_number,
        brightness=0.0,
        contrast=0.0,
        band_jitter=0.0,
        blur_prob_global=(0.0, 0.0),
        blur_prob_local=0.0,
    )


def test_the_second_global_crop_is_cut_from_the_second_date_with_shared_boxes() -> None:
    first, second = _images(3, 16, 0.0), _images(3, 16, 10.0)
    augment = _plain_augment()
    seasonal = augment(first, torch.Generator().manual_seed(1), second=second)
    plain = augment(first, torch.Generator().manual_seed(1))
    crops, same = seasonal["global_crops"], plain["global_crops"]
    # The draws are unchanged: view 1 is today's, view 2 the same box on the other date.
    torch.testing.assert_close(crops["s2"][:3], same["s2"][:3])
    torch.testing.assert_close(crops["s2"][3:], same["s2"][3:] + 10.0)
    # S1 and S2 of each view share the crop box (the ramp is the same in every band).
    for name in ("s1", "s2"):
        for channel in range(crops[name].shape[1]):
            torch.testing.assert_close(crops[name][:, channel], crops["s2"][:, 0])
    torch.testing.assert_close(seasonal["local_crops"]["s2"], plain["local_crops"]["s2"])


def test_locals_from_either_date_say_which() -> None:
    first, second = _images(4, 16, 0.0), _images(4, 16, 10.0)
    views = _plain_augment(3)(
        first, torch.Generator().manual_seed(2), second=second, locals_from_either=True
    )
    chosen = views["local_from_second"]
    assert chosen.shape == (12,) and 0 < int(chosen.sum()) < 12
    from_second = views["local_crops"]["s2"].amin(dim=(1, 2, 3)) >= 10.0
    assert torch.equal(from_second, chosen)


def test_the_second_global_crop_carries_the_second_date_s_day_of_year(
    series: Path, tmp_path: Path
) -> None:
    cfg = tiny_multimodal_config(*_sources(series), *SEASONAL, "train.views.seasonal.locals=any")
    trainer = Trainer(cfg, tmp_path / "run", resume=False)
    batch = next(iter(make_loader(cfg, 0, trainer.ctx)))
    views = trainer.make_views(batch, step=0)
    doy, doy_b = batch["doy"], batch["doy_b"]
    assert not torch.equal(doy, doy_b)
    assert torch.equal(views.global_doy, torch.cat([doy, doy_b]))
    n_local = cfg.crops.local_crops_number
    from_either = (views.local_doy == doy.repeat(n_local)) | (
        views.local_doy == doy_b.repeat(n_local)
    )
    assert bool(from_either.all()) and not torch.equal(views.local_doy, doy.repeat(n_local))


def test_resume_is_bitwise_with_seasonal_views(series: Path, tmp_path: Path) -> None:
    overrides = (*_sources(series), *SEASONAL, "train.views.seasonal.locals=any")
    full = tmp_path / "full"  # multimodal with day-of-year embedding: doy_b reaches the model
    assert train(tiny_multimodal_config(*overrides), full).final_step == 6
    records = [json.loads(line) for line in (full / "train_log.jsonl").open()]
    assert all(
        r["seasonal_pairs"] == 1.0 and 30 <= r["seasonal_days_apart"] <= 120 for r in records
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / "checkpoints" / checkpoint_name(step))
    assert train(tiny_multimodal_config(*overrides), resumed).resumed_from == 2
    expected = saved_tensors(full / "checkpoints", 6, "")
    got = saved_tensors(resumed / "checkpoints", 6, "")
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_seasonal_views(series: Path, tmp_path: Path) -> None:
    exact = [*TINY_OVERRIDES, "dino.koleo_loss_weight=0", "student.drop_path_rate=0"]
    overrides = [*exact, *_sources(series), *SEASONAL, "train.views.seasonal.locals=any"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for ranks, batch in ((1, 4), (2, 2)):
        run = tmp_path / f"ranks{ranks}"
        command = torchrun_train_command(
            ranks, run, *overrides, f"train.batch_size_per_gpu={batch}"
        )
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[ranks] = run
    one, two = (saved_tensors(runs[n] / "checkpoints", 6) for n in (1, 2))
    for key, value in one.items():
        assert torch.allclose(value, two[key], atol=1e-3), key
    logged = [
        [json.loads(line)["seasonal_days_apart"] for line in (runs[n] / "train_log.jsonl").open()]
        for n in (1, 2)
    ]
    assert logged[0] == pytest.approx(logged[1])  # the same samples, whatever the rank count


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            [
                "train.views.seasonal.enabled=true",
                "train.dataset.source=satlas",
                "train.dataset.uri=/d",
                "train.dataset.s2_layout=satlas",
                "student.in_chans=9",
            ],
            r"needs dated time series .*sen12ms, synthetic or shards packed .*\(not .satlas.",
        ),
        (
            [
                "train.dataset.source=sen12ms",
                "train.dataset.uri=/d",
                "train.views.seasonal.enabled=true",
                "train.views.seasonal.min_days_apart=90",
                "train.views.seasonal.max_days_apart=30",
            ],
            r"train\.views\.seasonal\.min_days_apart=90 must be in \[0, max_days_apart=30\]",
        ),
        (
            [
                "train.dataset.source=sen12ms",
                "train.dataset.uri=/d",
                "train.views.seasonal.enabled=true",
                "train.views.seasonal.locals=all",
            ],
            r"train\.views\.seasonal\.locals='all' is not one of same, any",
        ),
        (
            ["train.views.seasonal.max_days_apart=90"],
            r"applies only with train\.views\.seasonal\.enabled",
        ),
    ],
)
def test_bad_seasonal_keys_name_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("quickstart", overrides)


@pytest.fixture(scope="module")
def packed(series: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The series packed with second dates 30-120 days away, and packed with single dates."""
    root = tmp_path_factory.mktemp("packed")
    for name, extra in (("seasonal", ["--seasonal-days", "30:120"]), ("single", [])):
        assert main(["data", "pack", str(series), str(root / name), "--seed", "3", *extra]) == 0
    return root / "seasonal", root / "single"


def _shards(uri: Path) -> list[str]:
    return ["train.dataset.source=shards", f"train.dataset.uri={uri}"]


def test_packed_samples_carry_the_second_date_the_source_would_serve(
    series: Path, packed: tuple[Path, Path]
) -> None:
    seasonal, _ = packed
    source = Sen12MSSource(*store_access(open_store(str(series))))
    source.enable_seasonal_views(SeasonalViews(30, 120, seed=3))  # the pack's --seed
    expected = {source[i]["key"]: source[i] for i in range(len(source))}
    stream = ShardStream(open_store(str(seasonal)), share=BatchShare(4), seed=0, seasonal=(30, 120))
    batch = next(iter(stream))
    for row, key in enumerate(batch["key"]):
        want = expected[key]
        assert (
            batch["key_b"][row] == want["key_b"] and batch["days_apart"][row] == want["days_apart"]
        )
        assert np.array_equal(batch["s2_b"][row].numpy(), want["s2_b"])
        assert np.array_equal(batch["s1_b"][row].numpy(), want["s1_b"])
    single_view = next(iter(ShardStream(open_store(str(seasonal)), share=BatchShare(4), seed=0)))
    assert sorted(single_view) == ["doy", "key", "label", "s1", "s2"]  # second dates stay on disk


def test_training_from_seasonal_shards_and_the_errors_that_guard_it(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    seasonal, single = packed
    cfg = tiny_multimodal_config(*_shards(seasonal), *SEASONAL)
    assert train(cfg, tmp_path / "run").final_step == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").open()]
    assert all(r["seasonal_pairs"] == 1.0 for r in records)
    other_window = tiny_multimodal_config(
        *_shards(seasonal), *SEASONAL, "train.views.seasonal.max_days_apart=200"
    )
    with pytest.raises(RsdinoError, match=r"second dates 30-120 days apart, not .* 30-200"):
        train(other_window, tmp_path / "other")
    with pytest.raises(RsdinoError, match=r"packed without seasonal views; repack with"):
        train(tiny_multimodal_config(*_shards(single), *SEASONAL), tmp_path / "single")
    assert main(["data", "pack", "/nowhere", str(tmp_path / "x"), "--seasonal-days", "9"]) == 2
