"""Teacher encoder(s) out of a training checkpoint, into one safetensors file for downstream use.

DINOv2 evaluates and ships the teacher (the EMA of the student). The file holds the teacher's
whole :class:`RemoteSensingEncoder` (every sensor's ViT, fusion, temporal embedding) with the
run's resolved config in its metadata, so :func:`load_exported_encoder` rebuilds it with no other
file. A backbone's keys are ``backbones.<s1|s2>.`` + the official DINOv2 key names, so stripping
that prefix gives a state dict that DINOv2's own ViT loads.

The encoder expects its inputs normalised exactly as in training: per band ``(x - mean) / std``
with x as the sources store it (Sentinel-2 reflectance x10000, Sentinel-1 backscatter in dB).
Those band statistics (the run's ``train.dataset.stats`` file, or rsdino's defaults) go into the
metadata key ``band_stats`` too, so a user of the file needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rsdino.config.loader import ConfigError, load_config
from rsdino.data.destination import check_output_file
from rsdino.data.stats import input_band_names, normalizer_stats
from rsdino.data.storage import Store
from rsdino.errors import RsdinoError
from rsdino.models.build import build_encoder_from_config, modalities
from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.models.encoder_config import StudentConfig
from rsdino.train.checkpoint import CheckpointStore, open_checkpoint_store, read_tensors
from rsdino.train.output_dir import OutputDirError, output_paths

log = logging.getLogger(__name__)

FORMAT = "rsdino.teacher_encoder/1"
TEACHER_PREFIX = "model.teacher.encoder."
BAND_STATS_KEY = "band_stats"
NORMALISATION = (
    "(x - mean) / std per band, x as stored: Sentinel-2 reflectance x10000, Sentinel-1 dB"
)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    step: int
    source: str
    n_tensors: int
    config_path: Path  # the sidecar: OUT with .yaml in place of its suffix
    band_stats_source: str | None  # where the metadata's band statistics came from, or None


def export_teacher(checkpoints: Store, out: Path, step: int | None = None) -> ExportResult:
    """Write the teacher encoder of checkpoint ``step`` (default: newest complete) to ``out``."""
    check_output_file(out, "the exported encoder")  # before a whole checkpoint is read
    config_path = out.with_suffix(".yaml")
    if config_path == out:
        raise OutputDirError(
            f"--out {out} would be overwritten by its config; name it .safetensors"
        )
    check_output_file(config_path, "the exported encoder's config")
    store = CheckpointStore(checkpoints)
    step = store.select_complete(step)
    info = store.read_info(step)
    tensors = {
        name: tensor.contiguous()
        for name, tensor in read_tensors(store, step, TEACHER_PREFIX).items()
    }
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "rsdino_version": info.rsdino_version,
        "config": info.config,
    }
    band_stats, stats_source = _band_stats(info.config)
    if band_stats is not None:
        metadata[BAND_STATS_KEY] = band_stats
    _write_file(out, tensors, metadata)
    config_path.write_text(info.config)
    location = store.location(step)
    log.info(
        "exported the teacher encoder of %s (%d tensors) to %s, its config to %s",
        location,
        len(tensors),
        out,
        config_path,
    )
    if stats_source is not None:
        log.info(
            "normalise its inputs as in training: %s, with the mean/std of %s (stored in the "
            "file's metadata key %r)",
            NORMALISATION,
            stats_source,
            BAND_STATS_KEY,
        )
    return ExportResult(
        path=out,
        step=step,
        source=location,
        n_tensors=len(tensors),
        config_path=config_path,
        band_stats_source=stats_source,
    )


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 minus the umask (safetensors makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_file(out: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write atomically (an interrupted export never leaves a truncated file), readable by all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.chmod(temporary, _file_mode())
        os.replace(temporary, out)
    except (SafetensorError, OSError) as exc:
        temporary.unlink(missing_ok=True)
        raise OutputDirError(
            f"cannot write the exported encoder to {out}: {exc}; free space or pass another --out"
        ) from exc


def _band_stats(config_yaml: str) -> tuple[str | None, str | None]:
    """The run's per-band (mean, std) as JSON and where they came from; (None, None) if unknown.

    A stats file that can no longer be read (moved, credentials gone) does not stop the export:
    the weights are still useful, and the warning says what is missing.
    """
    try:
        cfg = OmegaConf.create(config_yaml)
        if not isinstance(cfg, DictConfig):
            raise ValueError("the stored config is not a mapping")
        dataset = cfg.train.dataset
        stats_file = dataset.stats or None
        bands = list(dataset.bands) if dataset.source == "geotiff" else []
        entries = {}
        for name in modalities(cfg):
            mean, std = normalizer_stats(stats_file, name, dataset.s2_layout, bands)
            names = input_band_names(name, dataset.s2_layout, bands)
            entries[name] = {"bands": list(names), "mean": mean, "std": std}
    except (RsdinoError, OmegaConfBaseException, ValueError) as exc:
        log.warning(
            "the export holds no band statistics (%s); normalise inputs with the statistics the "
            "run trained with (its train.dataset.stats)",
            exc,
        )
        return None, None
    source = stats_file or "rsdino's default Sentinel statistics (rsdino.data.bands)"
    document = {"source": source, "normalise": NORMALISATION, "modalities": entries}
    return json.dumps(document), source


def checkpoints_of_run(output_dir: Path) -> Store:
    """The checkpoint root a run directory's ``config.yaml`` names (its ``checkpoint.dir``)."""
    config = output_paths(output_dir).config
    if not config.is_file():
        raise RsdinoError(
            f"{output_dir} has no config.yaml, so it is not an rsdino run directory; pass the "
            "--output-dir given to rsdino train, or --checkpoint-dir"
        )
    cfg = load_config(str(config))
    return open_checkpoint_store(
        OmegaConf.to_object(cfg.checkpoint), OmegaConf.to_object(cfg.train.storage), output_dir
    ).store


def untrained_encoder(cfg: DictConfig) -> RemoteSensingEncoder:
    """The teacher encoder a stored run config describes, for its saved weights to load into.

    The config was re-read from YAML, so its ``student`` node is untyped: merging it into the
    schema makes the dataclass the builder takes.
    """
    try:
        student = OmegaConf.merge(OmegaConf.structured(StudentConfig), cfg.student)
    except OmegaConfBaseException as exc:
        raise ConfigError(
            f"the run's student config does not fit this rsdino version: {exc}. Evaluate or "
            "export it with the rsdino version that trained it"
        ) from exc
    return build_encoder_from_config(
        OmegaConf.to_object(student),
        multimodal=cfg.train.multimodal,
        img_size=cfg.crops.global_crops_size,
        drop_path_rate=0.0,
        load_pretrained=False,
    )


def load_exported_encoder(path: Path) -> RemoteSensingEncoder:
    """Rebuild an exported teacher encoder (eval mode, CPU) from its safetensors file alone."""
    with safe_open(str(path), framework="pt") as exported:
        metadata = exported.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise RsdinoError(f"{path} is not an rsdino teacher export (format {FORMAT})")
        state = {name: exported.get_tensor(name) for name in exported.keys()}  # noqa: SIM118
    try:
        cfg = OmegaConf.create(metadata["config"])
    except Exception as exc:  # OmegaConf raises several types on bad YAML
        raise ConfigError(f"the config stored in {path} does not parse: {exc}") from exc
    encoder = untrained_encoder(cfg)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()
