"""`rsdino data clouds`: the cloud cover of every Sentinel-2 acquisition, scored by s2cloudless.

SEN12MS-CR-TS keeps its cloudy acquisitions on purpose (it is a cloud-removal dataset), so a run
that wants clear views has to know which ones they are. One JSON file holds a score per S2 key;
``train.clouds.max_fraction`` reads it (``data.build.drop_cloudy``). Scoring a whole dataset takes
hours, so the command resumes like ``data pack``: keys already in the file under the same detector
settings are kept, and progress is saved every few batches.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from rsdino.config.loader import ConfigError
from rsdino.data.band_tables import S2_BANDS_SEN12MS
from rsdino.data.build import SourceSpec, open_source
from rsdino.data.cloud_scores import SCORES_KEY, read_scores, scores_document
from rsdino.data.destination import check_output_folder
from rsdino.data.read_ahead import ordered_map
from rsdino.data.sources.decode import DataError, check_band_count, decode_geotiff
from rsdino.data.storage import Store, open_store
from rsdino.errors import RsdinoError
from rsdino.train.output_dir import OutputDirError

log = logging.getLogger("rsdino")

# The ten bands s2cloudless's classifier reads when all_bands=False, in the order it reads them.
DETECTOR_BANDS: tuple[str, ...] = ("B1", "B2", "B4", "B5", "B8", "B8A", "B9", "B10", "B11", "B12")
_DETECTOR_BAND_INDEX = [S2_BANDS_SEN12MS.index(name) for name in DETECTOR_BANDS]
# L1C digital numbers are reflectance x 10000. (Products of baseline 04.00 and later, from 2022,
# also carry a +1000 offset; SEN12MS-CR-TS is from 2018 and has none.)
REFLECTANCE_SCALE = 10000.0
AVERAGE_OVER = 4  # radius in pixels of the disk the probabilities are averaged over
DILATION_SIZE = 2  # radius in pixels of the disk the mask is dilated with
SAVE_EVERY_BATCHES = 50  # a killed run loses at most this many batches of work
CLOUDY = 0.5  # the summary counts acquisitions with a larger cloud fraction
_LISTED_BAD_KEYS = 5  # the summary names this many bad keys; the log has every one


class MissingDependencyError(RsdinoError):
    """An optional package a command needs is not installed."""


def load_detector(threshold: float) -> tuple[Any, dict[str, Any]]:
    """The s2cloudless detector and the settings recorded with its scores.

    Imported here, not at module level: s2cloudless (and LightGBM, OpenCV) is an optional extra
    that only this command needs.
    """
    try:
        import s2cloudless
    except ImportError as exc:
        raise MissingDependencyError(
            f"`rsdino data clouds` needs the s2cloudless package ({exc}); "
            "pip install 'rsdino[clouds]'"
        ) from exc
    detector = s2cloudless.S2PixelCloudDetector(
        threshold=threshold,
        average_over=AVERAGE_OVER,
        dilation_size=DILATION_SIZE,
        all_bands=False,
    )
    settings = {
        "name": "s2cloudless",
        "version": s2cloudless.__version__,
        "threshold": threshold,
        "average_over": AVERAGE_OVER,
        "dilation_size": DILATION_SIZE,
    }
    return detector, settings


def detector_input(tiles: list[np.ndarray]) -> np.ndarray:
    """[N, H, W, 10] float32 reflectance from 13-band [13, H, W] digital-number tiles."""
    stacked = np.stack([tile[_DETECTOR_BAND_INDEX] for tile in tiles])
    return np.moveaxis(stacked, 1, -1).astype(np.float32) / np.float32(REFLECTANCE_SCALE)


def score_tiles(detector: Any, tiles: list[np.ndarray]) -> list[dict[str, float]]:
    """Cloud fraction (mean of the mask) and mean cloud probability of each tile.

    Tiles are batched by size, as the detector takes one [N, H, W, 10] array. The mask is made
    from the probabilities with ``get_mask_from_prob``, which is what ``get_cloud_masks`` does,
    so the classifier runs once for both numbers.
    """
    scores: list[dict[str, float]] = [{} for _ in tiles]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, tile in enumerate(tiles):
        by_size.setdefault(tile.shape, []).append(index)
    for indices in by_size.values():
        probabilities = detector.get_cloud_probability_maps(
            detector_input([tiles[i] for i in indices])
        )
        masks = detector.get_mask_from_prob(probabilities)
        for index, probability, mask in zip(indices, probabilities, masks, strict=True):
            scores[index] = {
                "cloud_fraction": round(float(mask.mean()), 6),
                "mean_probability": round(float(probability.mean()), 6),
            }
    return scores


def _load_tile(read: Callable[[str], bytes], key: str) -> np.ndarray | DataError:
    """The 13-band tile of ``key``, or the reason it is bad (returned, to cross threads)."""
    try:
        tile = decode_geotiff(read(key), key)
        check_band_count(tile, len(S2_BANDS_SEN12MS), key, "Sentinel-2 image")
    except DataError as error:
        return error
    return tile


def _read_scores(store: Store, location: str) -> dict[str, Any] | None:
    """The existing score file, or None; anything else under its name stops the command."""
    try:
        return read_scores(store, SCORES_KEY, location)
    except ValueError as exc:
        raise OutputDirError(f"{exc}; move it away or pass another --out") from exc


def _write_scores(store: Store, settings: dict[str, Any], scores: dict[str, dict]) -> None:
    """One write: the local store renames a complete temp file, S3 takes a single put."""
    store.write(SCORES_KEY, scores_document(settings, scores))


def _kept_scores(
    existing: dict[str, Any] | None, settings: dict[str, Any], location: str
) -> dict[str, dict]:
    """Scores of the existing file that hold under ``settings``; a change is announced."""
    if existing is None:
        return {}
    if existing["detector"] == settings:
        return dict(existing["acquisitions"])
    old = existing["detector"]
    changes = ", ".join(
        f"{name} {old.get(name)} -> {value}"
        for name, value in settings.items()
        if old.get(name) != value
    )
    print(
        f"detector settings changed ({changes}): rescoring every key; the "
        f"{len(existing['acquisitions'])} scores in {location} are replaced"
    )
    return {}


def _summary(
    keys: list[str], scores: dict[str, dict], scored: int, bad: dict[str, str], location: str
) -> str:
    fractions = [scores[key]["cloud_fraction"] for key in keys if key in scores]
    mean = f"{np.mean(fractions):.3f}" if fractions else "n/a"
    cloudy = sum(fraction > CLOUDY for fraction in fractions)
    line = (
        f"scored {scored}, skipped {len(fractions) - scored} already scored, {len(bad)} bad; "
        f"mean cloud fraction {mean}, {cloudy} of {len(fractions)} above {CLOUDY}; "
        f"scores in {location}"
    )
    if bad:
        listed = ", ".join(f"{key} ({kind})" for key, kind in list(bad.items())[:_LISTED_BAD_KEYS])
        more = len(bad) - _LISTED_BAD_KEYS
        line += f"; bad: {listed}" + (f" and {more} more (see the log)" if more > 0 else "")
    return line


def _check_options(args: argparse.Namespace) -> None:
    if not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {args.batch}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be 0 or more, got {args.workers}")


def run_clouds(args: argparse.Namespace) -> int:
    _check_options(args)
    detector, settings = load_detector(args.threshold)
    out = args.out or args.src
    location = f"{out.rstrip('/')}/{SCORES_KEY}"
    destination = open_store(out)
    check_output_folder(out, SCORES_KEY, destination)  # before any tile is read
    spec = SourceSpec(
        source="sen12ms",
        uri=args.src,
        split=args.split,
        layout=args.layout,
        on_error=args.on_error,
        multimodal=False,
    )
    keys = open_source(spec).keys
    existing = _read_scores(destination, location)
    scores = _kept_scores(existing, settings, location)
    pending = [key for key in keys if key not in scores]
    read = spec.open_store().read

    def load(key: str) -> tuple[str, np.ndarray | DataError]:
        return key, _load_tile(read, key)

    # Threads read ahead across batch boundaries while the detector scores the current batch.
    tiles = (
        ordered_map(load, pending, args.workers, "rsdino-clouds")
        if args.workers
        else (load(key) for key in pending)
    )
    bad: dict[str, str] = {}
    scored = unsaved = 0
    with contextlib.closing(tiles):  # a failure stops the reading threads too
        while batch := list(itertools.islice(tiles, args.batch)):
            good: dict[str, np.ndarray] = {}
            for key, tile in batch:
                if isinstance(tile, DataError):
                    if args.on_error == "fail":
                        raise tile
                    log.warning("%s: %s", tile.kind, tile)
                    bad[key] = tile.kind
                else:
                    good[key] = tile
            if good:
                scores.update(zip(good, score_tiles(detector, list(good.values())), strict=True))
                scored += len(good)
                unsaved += 1
            if unsaved >= SAVE_EVERY_BATCHES:
                _write_scores(destination, settings, scores)
                unsaved = 0
    if existing is None or scored or existing["detector"] != settings:
        _write_scores(destination, settings, scores)
    print(_summary(keys, scores, scored, bad, location))
    return 0
