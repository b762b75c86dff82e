"""Typed schema of the training config.

The dataclasses give every key a type so OmegaConf rejects unknown keys and wrong types with the
key's full path. Values live in ``default.yaml``; the sections defined here only say what may
exist, which is why their fields are ``MISSING``. Components that own their config (those in
``validate.COMPONENT_CONFIGS``) define defaults, field docs and checks beside the component, and
a test holds ``default.yaml`` to them.
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


@dataclass
class ViewsConfig:
    seasonal: SeasonalViewsConfig = field(default_factory=SeasonalViewsConfig)


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dataset_path: str = MISSING
    storage: StorageConfig = field(default_factory=StorageConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    clouds: CloudsConfig = field(default_factory=CloudsConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    multimodal: bool = MISSING
    modality_dropout: float = MISSING
    batch_size_per_gpu: int = MISSING
    num_workers: int = MISSING
    OFFICIAL_EPOCH_LENGTH: int = MISSING
    seed: int = MISSING
    centering: str = MISSING
    device: str = MISSING
    precision: str = MISSING
    reduce_precision: str = MISSING
    activation_checkpointing: bool = MISSING
    compile: str = MISSING
    log_every_steps: int = MISSING
    collective_timeout_s: int = MISSING
    loss_spike_factor: float = MISSING


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
