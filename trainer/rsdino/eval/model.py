"""The teacher encoder to evaluate, from an export, a run directory or a checkpoint root.

Evaluation reads the teacher, as DINOv2 does, with the run's own band layout and normalisation
statistics, so probes see inputs exactly as pretraining prepared them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from rsdino.data.bands import BandNormalizer
from rsdino.data.stats import normalizer_stats
from rsdino.data.storage import open_store
from rsdino.errors import ExitCode, RsdinoError
from rsdino.export import (
    TEACHER_PREFIX,
    checkpoints_of_run,
    load_exported_encoder,
    untrained_encoder,
)
from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.train.checkpoint import CheckpointStore, read_tensors


class ModelSourceError(RsdinoError):
    """The model to evaluate cannot be found or read."""

    exit_code = ExitCode.CHECKPOINT


@dataclass
class EvalModel:
    """An encoder in eval mode, its run config, and where its results go by default.

    ``identity`` changes whenever the weights do; it keys the feature cache. ``results_uri``
    is a local folder or s3:// prefix beside the export or checkpoint; ``name`` prefixes the
    result files.
    """

    encoder: RemoteSensingEncoder
    cfg: DictConfig
    identity: str
    results_uri: str
    name: str
    step: int

    @property
    def layout(self) -> str:
        return self.cfg.train.dataset.s2_layout

    def normalizers(self, stats: str | None = None) -> dict[str, BandNormalizer]:
        """One normaliser per modality, from ``stats`` or the run's ``train.dataset.stats``."""
        stats_file = stats or self.cfg.train.dataset.stats or None
        return {
            name: BandNormalizer(
                *normalizer_stats(stats_file, name, self.layout, list(self.cfg.train.dataset.bands))
            )
            for name in self.encoder.modalities
        }


def load_eval_model(source: str, step: int | None = None) -> EvalModel:
    """An exported ``.safetensors`` file, a run directory (has config.yaml) or a checkpoint root
    (a path or s3://bucket/prefix); ``step`` picks a checkpoint (default: the newest complete)."""
    path = Path(source)
    if source.endswith(".safetensors"):
        if step is not None:
            raise ModelSourceError(f"--step does not apply to an exported file ({source})")
        return _from_export(path)
    if "://" not in source and (path / "config.yaml").is_file():
        return _from_checkpoints(
            CheckpointStore(checkpoints_of_run(path)), step, str(path / "eval")
        )
    if "://" not in source and not path.is_dir():
        raise ModelSourceError(
            f"{source} is neither a .safetensors export, a run directory nor a checkpoint folder"
        )
    store = CheckpointStore(open_store(source))
    results = f"{source.rstrip('/')}/eval" if "://" in source else str(path / "eval")
    return _from_checkpoints(store, step, results)


def _from_export(path: Path) -> EvalModel:
    if not path.is_file():
        raise ModelSourceError(f"{path} does not exist; pass an `rsdino export` file")
    encoder = load_exported_encoder(path)
    with safe_open(str(path), framework="pt") as exported:
        metadata = exported.metadata() or {}
    stat = path.stat()
    return EvalModel(
        encoder=encoder,
        cfg=OmegaConf.create(metadata["config"]),
        identity=f"export|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}",
        results_uri=str(path.parent),
        name=path.stem,
        step=int(metadata.get("step", -1)),
    )


def _from_checkpoints(store: CheckpointStore, step: int | None, results_uri: str) -> EvalModel:
    step = store.select_complete(step)
    info = store.read_info(step)
    cfg = OmegaConf.create(info.config)
    encoder = untrained_encoder(cfg)
    encoder.load_state_dict(read_tensors(store, step, TEACHER_PREFIX), strict=True)
    config_hash = hashlib.sha256(info.config.encode()).hexdigest()[:16]
    return EvalModel(
        encoder=encoder.eval(),
        cfg=cfg,
        identity=f"checkpoint|{store.location(step)}|{config_hash}",
        results_uri=results_uri,
        name=f"step{step}",
        step=step,
    )
