"""Typed schema of the training config: the components' own sections, composed.

The dataclasses give every key a type so OmegaConf rejects unknown keys and wrong types with the
key's full path. Each section's dataclass lives beside its component (see
``validate.COMPONENT_CONFIGS`` and ``train/run_config.py``) with its defaults, field docs and
checks; a test holds ``default.yaml`` to them. Only ``train.dataset_path``, a shortcut that sets
``train.dataset``, has no default here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rsdino.data.augment_config import AugmentConfig, CropsConfig
from rsdino.data.clouds_config import CloudsConfig
from rsdino.data.seasonal import SeasonalViewsConfig
from rsdino.data.source_config import DatasetConfig, StorageConfig, SyntheticConfig
from rsdino.models.encoder_config import StudentConfig
from rsdino.ssl.loss_config import DinoConfig, IBotConfig
from rsdino.ssl.schedule_config import OptimConfig, TeacherConfig
from rsdino.train.checkpoint_config import CheckpointConfig
from rsdino.train.evaluation_config import EvaluationConfig
from rsdino.train.metrics_config import CurvesConfig, MetricsConfig
from rsdino.train.run_config import RunConfig


@dataclass
class ViewsConfig:
    seasonal: SeasonalViewsConfig = field(default_factory=SeasonalViewsConfig)


@dataclass
class TrainConfig(RunConfig):
    """``train``: the run-level keys (``RunConfig``) and the data sections."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dataset_path: str = MISSING
    storage: StorageConfig = field(default_factory=StorageConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    clouds: CloudsConfig = field(default_factory=CloudsConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)


@dataclass
class RootConfig:
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IBotConfig = field(default_factory=IBotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    curves: CurvesConfig = field(default_factory=CurvesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
