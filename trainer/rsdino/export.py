"""Teacher encoder(s) out of a training checkpoint, into one safetensors file for downstream use.

DINOv2 evaluates and ships the teacher (the EMA of the student). The file holds the teacher's
whole :class:`RemoteSensingEncoder` (every sensor's ViT, fusion, temporal embedding) with the
run's resolved config in its metadata, so :func:`load_exported_encoder` rebuilds it with no other
file. A backbone's keys are ``backbones.<s1|s2>.`` + the official DINOv2 key names, so stripping
that prefix gives a state dict that DINOv2's own ViT loads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from rsdino.config.loader import ConfigError, load_config
from rsdino.data.storage import Store
from rsdino.errors import RsdinoError
from rsdino.models.build import build_encoder_from_config
from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.train.checkpoint import CheckpointStore, open_checkpoint_store, read_tensors
from rsdino.train.output_dir import output_paths

log = logging.getLogger(__name__)

FORMAT = "rsdino.teacher_encoder/1"
TEACHER_PREFIX = "model.teacher.encoder."


@dataclass(frozen=True)
class ExportResult:
    path: Path
    step: int
    source: str
    n_tensors: int


def export_teacher(checkpoints: Store, out: Path, step: int | None = None) -> ExportResult:
    """Write the teacher encoder of checkpoint ``step`` (default: newest complete) to ``out``."""
    store = CheckpointStore(checkpoints)
    complete = store.complete_steps()
    if not complete:
        raise RsdinoError(
            f"no complete checkpoint in {checkpoints.uri}; pass the run's --output-dir or its "
            "checkpoint.dir"
        )
    step = complete[-1] if step is None else step
    if step not in complete:
        raise RsdinoError(
            f"no complete checkpoint for step {step} in {checkpoints.uri}; complete steps: "
            f"{', '.join(map(str, complete))}"
        )
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
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, out)  # an interrupted export never leaves a truncated file
    out.with_suffix(".yaml").write_text(info.config)
    location = store.location(step)
    log.info("exported the teacher encoder of %s (%d tensors) to %s", location, len(tensors), out)
    return ExportResult(path=out, step=step, source=location, n_tensors=len(tensors))


def checkpoints_of_run(output_dir: Path) -> Store:
    """The checkpoint root a run directory's ``config.yaml`` names (its ``checkpoint.dir``)."""
    config = output_paths(output_dir).config
    if not config.is_file():
        raise RsdinoError(
            f"{output_dir} has no config.yaml, so it is not an rsdino run directory; pass the "
            "--output-dir given to rsdino train, or --checkpoint-dir"
        )
    return open_checkpoint_store(load_config(str(config)), output_dir).store


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
    encoder = build_encoder_from_config(cfg, drop_path_rate=0.0, load_pretrained=False)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()
