"""Build the run config: ``default.yaml`` + a preset (or YAML file) + ``key=value`` overrides.

Every layer is merged into the typed schema, so an unknown key, a wrong type or a missing value
fails here, before any model is built, with the key's path and the layer it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rsdino.config.schema import RootConfig
from rsdino.config.validate import validate_config
from rsdino.data.dataset_string import parse_dataset_string
from rsdino.errors import ExitCode, RsdinoError


class ConfigError(RsdinoError, ValueError):
    """A config problem the user has to fix; the message names the key and the source."""

    exit_code = ExitCode.CONFIG
    label = "config error"


# DINOv2 config sections that rsdino replaces by simpler keys: a research-fork config that still
# holds them is told what to set instead of only that the key is unknown.
REPLACED_SECTIONS = {
    "compute_precision": (
        "DINOv2's compute_precision.* is replaced by train.precision (autocast and FSDP2 "
        "parameter dtype: auto, bf16 or fp32) and train.reduce_precision (gradient reduction "
        "dtype: fp32 or bf16); bf16 needs no grad scaler"
    ),
}


def _replacement_hint(full_key: str) -> str:
    hint = REPLACED_SECTIONS.get(full_key.partition(".")[0])
    return f"; {hint}" if hint else ""


def _config_dir() -> Path:
    return Path(str(resources.files("rsdino.config")))


def available_presets() -> list[str]:
    return sorted(p.stem for p in (_config_dir() / "presets").glob("*.yaml"))


def resolve_preset_path(preset: str) -> Path:
    """A preset name (``quickstart``) or a path to a YAML file."""
    path = Path(preset)
    if path.suffix in {".yaml", ".yml"} or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(f"config file '{preset}' does not exist")
        return path
    candidate = _config_dir() / "presets" / f"{preset}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown preset '{preset}'; available presets: {', '.join(available_presets())} "
            "(or pass a path to a .yaml file)"
        )
    return candidate


def _load_yaml(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}") from exc
    except (OSError, OmegaConfBaseException, ValueError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not a list")
    return loaded


def _preset_chain(preset: str) -> list[tuple[str, Path, DictConfig]]:
    """The preset and the presets it builds on (``base: NAME``), most basic first."""
    chain: list[tuple[str, Path, DictConfig]] = []
    name: str | None = preset
    while name is not None:
        path = resolve_preset_path(name)
        if any(seen == path for _, seen, _ in chain):
            raise ConfigError(f"preset '{preset}': 'base' entries form a cycle at '{name}'")
        layer = _load_yaml(path)
        base = layer.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"preset '{name}' ({path}): 'base' must be a preset name or path")
        chain.append((name, path, layer))
        name = base
    return chain[::-1]


def _dataset_from_string(text: str) -> DictConfig:
    """DINOv2-style ``Name:split=X:root=Y`` strings, as the research fork's configs hold."""
    try:
        parsed = parse_dataset_string(text)
    except ValueError as exc:
        raise ConfigError(f"train.dataset_path: {exc}") from exc
    if parsed["source"] == "satlas":
        parsed["s2_layout"] = "satlas"  # Satlas tiles only exist in their 9-band composite
    return OmegaConf.create({"train": {"dataset": parsed}})


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line, with the line and column where it noticed it."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return f"{exc.problem or exc.context}{where}"
    return str(exc).splitlines()[0]


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    parsed = OmegaConf.create()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key.path=value")
        try:
            parsed = OmegaConf.merge(parsed, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"override {key}: the value {value!r} is not valid YAML ({_yaml_problem(exc)}); "
                "quote strings and close lists, e.g. key=[0.4,1.0]"
            ) from exc
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {key}: cannot parse {item!r}: {exc}") from exc
    return parsed


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(base, layer)
    except OmegaConfBaseException as exc:
        detail = str(exc.msg).splitlines()[0] if exc.msg else str(exc)
        hint = _replacement_hint(str(exc.full_key))
        raise ConfigError(f"{source}: {detail} (key: {exc.full_key}){hint}") from exc
    assert isinstance(merged, DictConfig)
    return merged


def load_config(preset: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Return the validated, read-only config for a run."""
    cfg = OmegaConf.structured(RootConfig)
    defaults = _load_yaml(_config_dir() / "default.yaml")
    cfg = _merge(cfg, defaults, "default.yaml")
    if preset:
        for name, path, layer in _preset_chain(preset):
            cfg = _merge(cfg, layer, f"preset '{name}' ({path})")
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), "command-line override")
    if cfg.train.dataset_path:
        cfg = _merge(cfg, _dataset_from_string(cfg.train.dataset_path), "train.dataset_path")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(missing)}")
    problems = validate_config(cfg, defaults)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
