"""Semantic checks the type system cannot express (ranges, divisibility, choices).

Each problem names the key path and what to change, so a bad config fails in a second instead
of after the model is built or, worse, hours into a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

from omegaconf import DictConfig, OmegaConf

from rsdino.config.component import ConfigProblems
from rsdino.data.augment_config import AugmentConfig, CropsConfig
from rsdino.data.band_tables import S1_BANDS, S2_LAYOUTS
from rsdino.data.clouds_config import CloudsConfig
from rsdino.data.seasonal import SeasonalViewsConfig
from rsdino.data.source_config import DatasetConfig, StorageConfig, SyntheticConfig
from rsdino.models.encoder_config import StudentConfig
from rsdino.models.specs import ARCH_SPECS
from rsdino.ssl.loss_config import DinoConfig, IBotConfig
from rsdino.ssl.schedule_config import OptimConfig, TeacherConfig
from rsdino.train.checkpoint_config import CheckpointConfig
from rsdino.train.evaluation_config import EvaluationConfig
from rsdino.train.metrics_config import CurvesConfig, MetricsConfig
from rsdino.train.run_config import RunConfig

# Sections whose dataclass owns its defaults, field docs and checks (see config/component.py).
COMPONENT_CONFIGS: dict[str, type] = {
    "crops": CropsConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "teacher": TeacherConfig,
    "checkpoint": CheckpointConfig,
    "dino": DinoConfig,
    "ibot": IBotConfig,
    "metrics": MetricsConfig,
    "curves": CurvesConfig,
    "train.dataset": DatasetConfig,
    "train.storage": StorageConfig,
    "train.synthetic": SyntheticConfig,
    "train.views.seasonal": SeasonalViewsConfig,
    "train.clouds": CloudsConfig,
    "evaluation": EvaluationConfig,
    "student": StudentConfig,
}


def _choice(problems: list[str], key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {', '.join(choices)}")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _arch_keys(cfg: DictConfig) -> tuple[str, ...]:
    return ("arch_s1", "arch_s2") if cfg.train.multimodal else ("arch",)


def encoder_dims(cfg: DictConfig) -> dict[str, int]:
    """Token width of each encoder the config builds (after the embed_dim override)."""
    return {
        key: cfg.student.embed_dim or ARCH_SPECS[cfg.student[key]][0]
        for key in _arch_keys(cfg)
        if cfg.student[key] in ARCH_SPECS
    }


def _validate_arch(problems: list[str], cfg: DictConfig, key: str) -> None:
    student = cfg.student
    arch = student[key]
    if arch not in ARCH_SPECS:
        _choice(problems, f"student.{key}", arch, tuple(ARCH_SPECS))
        return
    spec_dim, spec_depth, spec_heads = ARCH_SPECS[arch]
    embed_dim = student.embed_dim or spec_dim
    num_heads = student.num_heads or spec_heads
    depth = student.depth or spec_depth
    _check(
        problems,
        embed_dim > 0 and num_heads > 0 and embed_dim % num_heads == 0,
        f"student.{key}={arch}: embed_dim={embed_dim} must be a positive multiple of "
        f"num_heads={num_heads}",
    )
    if student.block_chunks > 1:
        _check(
            problems,
            depth % student.block_chunks == 0,
            f"student.block_chunks={student.block_chunks} must divide the depth ({depth}) "
            f"of student.{key}={arch}",
        )


def _validate_multimodal(problems: list[str], cfg: DictConfig) -> None:
    student = cfg.student
    _check(
        problems,
        student.in_chans_s1 == len(S1_BANDS),
        f"student.in_chans_s1={student.in_chans_s1} but Sentinel-1 has {len(S1_BANDS)} bands "
        f"({', '.join(S1_BANDS)})",
    )
    xattn = student.xattn
    fused_dim = max(encoder_dims(cfg).values(), default=0)
    if student.fuse_alg == "xattn":
        _check(
            problems,
            xattn.nhead >= 1 and fused_dim % xattn.nhead == 0,
            f"student.xattn.nhead={xattn.nhead} must divide the fused width {fused_dim}",
        )


def _validate_clouds(problems: list[str], cfg: DictConfig) -> None:
    """What the filter needs from other sections; its own values are CloudsConfig's to check."""
    clouds = cfg.train.clouds
    if clouds.max_fraction >= 1:
        return
    _check(
        problems,
        cfg.train.dataset.source == "sen12ms",
        f"train.clouds.max_fraction needs train.dataset.source=sen12ms (the scores name its "
        f"Sentinel-2 files), not {cfg.train.dataset.source!r}",
    )
    _check(
        problems,
        clouds.policy != "sar_only" or cfg.train.multimodal,
        "train.clouds.policy=sar_only shows the student Sentinel-1 in place of a cloudy "
        "Sentinel-2 view, so it needs train.multimodal=true",
    )


def _validate_seasonal_views(problems: list[str], cfg: DictConfig) -> None:
    seasonal = cfg.train.views.seasonal
    if not seasonal.enabled:
        return
    source = cfg.train.dataset.source
    _check(
        problems,
        source in ("sen12ms", "synthetic", "shards"),
        "train.views.seasonal needs dated time series of each patch: train.dataset.source="
        f"sen12ms, synthetic or shards packed with --seasonal-days (not {source!r}: it has "
        "single dates)",
    )
    # The window itself is SeasonalViewsConfig's to check; a synthetic second date is a real gap
    # in the season, so that source needs one day at least.
    _check(
        problems,
        source != "synthetic" or seasonal.min_days_apart >= 1,
        "train.views.seasonal.min_days_apart=0 with train.dataset.source=synthetic: its second "
        "date is another day of the season; set min_days_apart >= 1",
    )


def _validate_dataset(problems: list[str], cfg: DictConfig) -> None:
    """What the dataset needs from the mode; its own keys are DatasetConfig's to check."""
    source = cfg.train.dataset.source
    if cfg.train.multimodal:
        _check(
            problems,
            source in ("sen12ms", "shards", "synthetic"),
            f"train.multimodal=true needs paired Sentinel-1/-2 data (source sen12ms, shards or "
            f"synthetic), not {source!r}",
        )


def _validate_bands(problems: list[str], cfg: DictConfig) -> None:
    """``bands`` picks GeoTIFF bands, indices into the s2_layout order the files are stored in."""
    dataset = cfg.train.dataset
    bands = list(dataset.bands)
    if not bands:
        return
    if dataset.source != "geotiff":
        problems.append(
            f"train.dataset.bands={bands} picks bands of GeoTIFF files, but "
            f"train.dataset.source={dataset.source!r} always reads all its bands; remove "
            "train.dataset.bands or use train.dataset.source=geotiff"
        )
        return
    layout_bands = S2_LAYOUTS.get(dataset.s2_layout, ())
    _check(
        problems,
        all(1 <= band <= len(layout_bands) for band in bands) and len(set(bands)) == len(bands),
        f"train.dataset.bands={bands} must be distinct 1-based indices into the "
        f"{len(layout_bands)} bands of train.dataset.s2_layout={dataset.s2_layout!r}",
    )


def s2_band_count(cfg: DictConfig) -> int | None:
    """How many Sentinel-2 bands the model gets: the picked GeoTIFF bands, else the layout's."""
    dataset = cfg.train.dataset
    if dataset.source == "geotiff" and dataset.bands:
        return len(dataset.bands)
    layout = S2_LAYOUTS.get(dataset.s2_layout)
    return None if layout is None else len(layout)


def _validate_evaluation(problems: list[str], cfg: DictConfig) -> None:
    """What periodic kNN needs from other sections; its own keys are EvaluationConfig's."""
    ev = cfg.evaluation
    if ev.eval_period_iterations == 0:
        return
    if ev.dataset == "synthetic":
        _check(
            problems,
            cfg.train.dataset.source == "synthetic",
            "evaluation.dataset=synthetic draws unseen tiles of the synthetic world, so it needs "
            f"train.dataset.source=synthetic (not {cfg.train.dataset.source!r}); use "
            "evaluation.dataset=eurosat with evaluation.uri",
        )
    elif ev.dataset == "eurosat":
        _check(
            problems,
            not cfg.train.dataset.bands,
            "periodic evaluation of a band subset (train.dataset.bands) is not supported; run "
            "`rsdino eval knn` on a checkpoint instead",
        )


# Keys that only one mode reads: set away from default.yaml in another mode, they would be
# ignored silently, so they are errors naming the key and the mode that would read them.
MODE_KEYS: tuple[tuple[str, Callable[[DictConfig], bool], tuple[str, ...]], ...] = (
    (
        "train.multimodal=true",
        lambda cfg: cfg.train.multimodal,
        (
            "student.arch_s1",
            "student.arch_s2",
            "student.in_chans_s1",
            "student.in_chans_s2",
            "student.fuse_alg",
            "student.xattn.nhead",
            "student.xattn.nlayer",
            "student.xattn.dropout",
        ),
    ),
    (
        "train.dataset.source=sen12ms",
        lambda cfg: cfg.train.dataset.source == "sen12ms",
        ("train.dataset.layout",),
    ),
    (
        "train.views.seasonal.enabled=true",
        lambda cfg: cfg.train.views.seasonal.enabled,
        (
            "train.views.seasonal.min_days_apart",
            "train.views.seasonal.max_days_apart",
            "train.views.seasonal.locals",
        ),
    ),
    (
        "train.clouds.max_fraction < 1",
        lambda cfg: cfg.train.clouds.max_fraction < 1,
        ("train.clouds.scores", "train.clouds.policy"),
    ),
    (
        "train.clouds.policy=weight",
        lambda cfg: cfg.train.clouds.max_fraction < 1 and cfg.train.clouds.policy == "weight",
        ("train.clouds.loss_weight",),
    ),
    (
        "ibot.separate_head=true",
        lambda cfg: cfg.ibot.separate_head,
        (
            "ibot.head_n_prototypes",
            "ibot.head_bottleneck_dim",
            "ibot.head_nlayers",
            "ibot.head_hidden_dim",
        ),
    ),
)


def _validate_applicable(problems: list[str], cfg: DictConfig, defaults: DictConfig) -> None:
    """A key the chosen mode does not read must keep its default, or the user thinks it works."""
    for mode, active, keys in MODE_KEYS:
        if active(cfg):
            continue
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value != OmegaConf.select(defaults, key):
                problems.append(
                    f"{key}={value!r} applies only with {mode}, which this config does not "
                    "set; remove the key or set that mode"
                )


def _validate_run(problems: list[str], cfg: DictConfig) -> None:
    """``train``'s own keys; its sub-sections are components of their own, checked once each."""
    try:
        RunConfig(**{spec.name: cfg.train[spec.name] for spec in fields(RunConfig)})
    except ConfigProblems as exc:
        problems.extend(exc.problems)


def _validate_components(problems: list[str], cfg: DictConfig) -> None:
    """Sections whose dataclass checks itself: building it runs its ``__post_init__``."""
    for section in COMPONENT_CONFIGS:
        try:
            OmegaConf.to_object(OmegaConf.select(cfg, section))
        except ConfigProblems as exc:
            problems.extend(exc.problems)


def validate_config(cfg: DictConfig, defaults: DictConfig) -> list[str]:
    """Return human-readable problems; an empty list means the config is usable. ``defaults``
    is the ``default.yaml`` layer the config was built on (keys of other modes must keep it)."""
    problems: list[str] = []
    train, student, crops = cfg.train, cfg.student, cfg.crops

    _validate_run(problems, cfg)
    _validate_components(problems, cfg)
    _validate_dataset(problems, cfg)
    _validate_bands(problems, cfg)
    _validate_evaluation(problems, cfg)
    _validate_clouds(problems, cfg)
    _validate_seasonal_views(problems, cfg)
    _validate_applicable(problems, cfg, defaults)
    s2_key = "student.in_chans_s2" if train.multimodal else "student.in_chans"
    s2_chans = student.in_chans_s2 if train.multimodal else student.in_chans
    bands = s2_band_count(cfg)
    if bands is not None and train.dataset.source == "geotiff" and train.dataset.bands:
        _check(
            problems,
            s2_chans == bands,
            f"{s2_key}={s2_chans} but train.dataset.bands={list(train.dataset.bands)} picks "
            f"{bands} bands; set {s2_key}={bands}",
        )
    elif bands is not None:
        _check(
            problems,
            s2_chans == bands,
            f"{s2_key}={s2_chans} but train.dataset.s2_layout="
            f"{train.dataset.s2_layout!r} has {bands} bands; set {s2_key}={bands}",
        )
    if train.multimodal:
        _validate_multimodal(problems, cfg)

    for key in _arch_keys(cfg):
        _validate_arch(problems, cfg, key)
    for key in ("global_crops_size", "local_crops_size"):
        size = crops[key]
        _check(
            problems,
            size >= student.patch_size and size % student.patch_size == 0,
            f"crops.{key}={size} must be a positive multiple of student.patch_size="
            f"{student.patch_size}",
        )

    return problems
