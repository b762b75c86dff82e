"""Config layering and validation: bad configs fail before training, naming the key."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rsdino.config import loader
from rsdino.config.component import ConfigProblems
from rsdino.config.loader import ConfigError, available_presets, load_config
from rsdino.config.validate import COMPONENT_CONFIGS
from rsdino.data.augment_config import AugmentConfig
from rsdino.train.run_config import RunConfig

DEFAULT_YAML = OmegaConf.load(Path(loader.__file__).parent / "default.yaml")


def test_default_config_is_complete_and_valid() -> None:
    cfg = load_config()
    assert cfg.student.arch == "vit_large"
    assert cfg.dino.head_n_prototypes == 65536
    assert OmegaConf.is_readonly(cfg)


def test_presets_ship_and_load() -> None:
    assert {"quickstart", "vitl16_short_s2"} <= set(available_presets())
    for preset in available_presets():
        load_config(preset)


def test_satlas_preset_uses_nine_bands() -> None:
    cfg = load_config("vitl16_short_s2")
    assert cfg.student.in_chans == 9
    assert cfg.train.dataset.s2_layout == "satlas"
    assert cfg.student.block_chunks == 4


def test_override_layers_apply_in_order(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("optim:\n  base_lr: 0.01\n  epochs: 17\n")
    cfg = load_config(str(preset), ["optim.base_lr=0.002", "crops.global_crops_scale=[0.4,1.0]"])
    assert cfg.optim.base_lr == 0.002
    assert cfg.optim.epochs == 17
    assert list(cfg.crops.global_crops_scale) == [0.4, 1.0]


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"optim\.bogus_key"):
        load_config("quickstart", ["optim.bogus_key=1"])


def test_unknown_key_in_preset_file_names_file_and_path(tmp_path: Path) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text("student:\n  archh: vit_small\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*student\.archh"):
        load_config(str(preset))


def test_wrong_type_names_its_path() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size_per_gpu"):
        load_config(None, ["train.batch_size_per_gpu=many"])


def test_missing_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*quickstart"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/none.yaml")


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config("quickstart", ["optim.base_lr"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("crops.global_crops_size=50", r"crops\.global_crops_size=50 must be a positive multiple"),
        ("crops.local_crops_size=20", r"crops\.local_crops_size=20"),
        ("ibot.mask_ratio_min_max=[0.5,0.1]", r"ibot\.mask_ratio_min_max"),
        ("train.centering=median", r"train\.centering='median'"),
        ("student.arch=vit_huge", r"student\.arch='vit_huge'"),
        ("student.in_chans=4", r"student\.in_chans=4 but .* has 13 bands"),
        ("train.dataset.source=imagenet", r"train\.dataset\.source='imagenet' is not one of"),
        ("optim.scaling_rule=cubic", r"optim\.scaling_rule"),
        ("student.embed_dim=100", r"multiple of num_heads"),
        ("student.block_chunks=3", r"student\.block_chunks=3 must divide"),
        ("teacher.momentum_teacher=1.5", r"teacher\.momentum_teacher"),
        ("dino.head_nlayers=0", r"dino\.head_nlayers=0 must be >= 1"),
        ("metrics.port=70000", r"metrics\.port=70000 must be null or in \[1, 65535\]"),
        ("curves.tensorboard=maybe", r"curves\.tensorboard='maybe' is not one of"),
        ("checkpoint.keep=0", r"checkpoint\.keep=0 must be >= 1"),
        ("train.storage.max_attempts=0", r"train\.storage\.max_attempts=0 must be >= 1"),
        ("train.synthetic.tile_size=4", r"train\.synthetic\.tile_size=4 must be >= 8"),
        ("train.views.seasonal.locals=all", r"seasonal\.locals='all' is not one of same, any"),
        ("train.batch_size_per_gpu=0", r"train\.batch_size_per_gpu=0 must be >= 1"),
        ("train.compile=maybe", r"train\.compile='maybe' is not one of auto, true, false"),
        ("train.modality_dropout=0.2", r"modality_dropout=0\.2 needs train\.multimodal=true"),
    ],
)
def test_impossible_values_fail_with_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("quickstart", [override])


GEOTIFF = ["train.dataset.source=geotiff", "train.dataset.uri=/data/tiles"]


def test_geotiff_bands_pick_a_subset_that_sets_in_chans() -> None:
    cfg = load_config("quickstart", [*GEOTIFF, "train.dataset.bands=[2,3,4]", "student.in_chans=3"])
    assert list(cfg.train.dataset.bands) == [2, 3, 4] and cfg.student.in_chans == 3
    with pytest.raises(ConfigError, match=r"student\.in_chans=13 but .*bands=\[2, 3, 4\] picks 3"):
        load_config("quickstart", [*GEOTIFF, "train.dataset.bands=[2,3,4]"])
    for bands in ("[14]", "[2,2]", "[0]"):
        with pytest.raises(ConfigError, match=r"distinct 1-based indices into the 13 bands"):
            load_config("quickstart", [*GEOTIFF, f"train.dataset.bands={bands}"])


@pytest.mark.parametrize(
    "source",
    [
        ["train.dataset.source=sen12ms", "train.dataset.uri=/data/sen12ms"],
        [
            "train.dataset.source=satlas",
            "train.dataset.uri=/data/satlas",
            "train.dataset.s2_layout=satlas",
            "student.in_chans=9",
        ],
        ["train.dataset.source=shards", "train.dataset.uri=/data/shards"],
        ["train.dataset.source=synthetic"],
    ],
)
def test_bands_for_a_source_that_reads_whole_tiles_is_an_error(source: list[str]) -> None:
    name = source[0].partition("=")[2]
    pattern = rf"train\.dataset\.bands=\[2, 3, 4\] .* train\.dataset\.source='{name}'"
    with pytest.raises(ConfigError, match=pattern):
        load_config("quickstart", [*source, "train.dataset.bands=[2,3,4]", "student.in_chans=3"])


@pytest.mark.parametrize(
    ("preset", "override", "mode"),
    [
        ("quickstart", "student.fuse_alg=nonsense", "train.multimodal=true"),
        ("quickstart", "student.arch_s1=vit_nonexistent", "train.multimodal=true"),
        ("quickstart", "student.xattn.nhead=2", "train.multimodal=true"),
        ("quickstart", "train.dataset.layout=pairs", "train.dataset.source=sen12ms"),
        ("vitl16_short", "ibot.head_n_prototypes=4096", "ibot.separate_head=true"),
    ],
)
def test_a_key_the_mode_does_not_read_names_the_key_and_the_mode(
    preset: str, override: str, mode: str
) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=.* applies only with {mode}"):
        load_config(preset, [override])


def test_keys_of_the_active_mode_and_defaults_elsewhere_are_accepted() -> None:
    cfg = load_config(
        "quickstart_multimodal", ["student.fuse_alg=xattn", "student.arch_s1=vit_tiny"]
    )
    assert cfg.student.fuse_alg == "xattn" and cfg.student.arch_s1 == "vit_tiny"
    sen12ms = [
        "train.dataset.source=sen12ms",
        "train.dataset.uri=/data",
        "train.dataset.layout=pairs",
    ]
    assert load_config("quickstart", sen12ms).train.dataset.layout == "pairs"
    assert load_config("vitl14").ibot.head_n_prototypes == 131072  # separate_head: true there
    # A unimodal run whose multimodal keys hold their defaults is fine.
    assert load_config("quickstart").student.fuse_alg == "linear"


@pytest.mark.parametrize("section", sorted(COMPONENT_CONFIGS))
def test_default_yaml_holds_each_component_configs_own_defaults(section: str) -> None:
    """default.yaml documents the full config; it cannot drift from the dataclass defaults."""
    owned = OmegaConf.to_container(OmegaConf.structured(COMPONENT_CONFIGS[section]))
    assert OmegaConf.to_container(OmegaConf.select(DEFAULT_YAML, section)) == owned


def test_default_yaml_holds_the_run_configs_own_defaults() -> None:
    """``train``'s own keys are RunConfig's; its sub-sections are components checked above."""
    owned = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    train = OmegaConf.to_container(DEFAULT_YAML.train)
    assert {key: train[key] for key in owned} == owned
    sections = {key for key, value in train.items() if isinstance(value, dict)}
    assert set(train) - sections - {"dataset_path"} == set(owned)  # no scalar without a home
    assert {f"train.{name}" for name in sections} <= {*COMPONENT_CONFIGS, "train.views"}


@pytest.mark.parametrize(
    "cls", [*COMPONENT_CONFIGS.values(), RunConfig], ids=lambda cls: cls.__name__
)
def test_every_field_of_a_component_config_has_a_docstring(cls: type) -> None:
    (body,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    documented = {
        field.target.id
        for field, after in itertools.pairwise(body.body)
        if isinstance(field, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
    }
    assert documented == {spec.name for spec in dataclasses.fields(cls)}


def test_component_checks_name_every_bad_key_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(
            "quickstart",
            ["augment.blur_sigma=[0,1]", "crops.local_crops_scale=[0.1,2]", "augment.flip_prob=2"],
        )
    message = str(raised.value)
    assert "augment.blur_sigma=[0.0, 1.0] must be [min, max] with 0.0 < min" in message
    assert "crops.local_crops_scale=[0.1, 2.0] must be [min, max]" in message
    assert "augment.flip_prob=2.0 must be a probability in [0, 1]" in message
    # The same checks guard a component built without a config file.
    with pytest.raises(ConfigProblems, match=r"augment\.contrast=1\.5 must be in \[0, 1\]"):
        AugmentConfig(contrast=1.5)


def test_dataset_checks_name_the_key_and_the_fix() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config("quickstart", ["train.dataset.source=satlas", "train.dataset.on_error=retry"])
    message = str(raised.value)
    assert "train.dataset.on_error='retry' is not one of skip, fail" in message
    assert "train.dataset.uri is needed by train.dataset.source='satlas'" in message
    assert "set train.dataset.s2_layout=satlas" in message
