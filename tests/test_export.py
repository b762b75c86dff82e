"""`rsdino export`: a checkpoint's teacher encoder(s) as one self-describing safetensors file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import saved_tensors, tiny_config, tiny_multimodal_config
from omegaconf import OmegaConf
from safetensors import safe_open

from rsdino.cli import main
from rsdino.config.loader import ConfigError, config_to_yaml
from rsdino.data.bands import S2_BANDS_SEN12MS
from rsdino.data.bands import band_stats as rsdino_band_stats
from rsdino.errors import ExitCode, RsdinoError
from rsdino.eval.model import load_eval_model
from rsdino.export import _band_stats, load_exported_encoder, untrained_encoder
from rsdino.models.encoder import RemoteSensingEncoder
from rsdino.train.checkpoint import MARKER, CheckpointError, checkpoint_name
from rsdino.train.loop import train

pytest_plugins = ["s3_server"]


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_round_trips_the_multimodal_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train(tiny_multimodal_config("student.fuse_alg=xattn"), run)
    out = tmp_path / "teacher.safetensors"
    code, stdout, _ = _export(capsys, "--output-dir", str(run), "--out", str(out))
    assert code == 0 and "step 6" in stdout
    teacher = saved_tensors(run / "checkpoints", 6, "model.teacher.encoder.")
    with safe_open(str(out), framework="pt") as exported:
        assert sorted(exported.keys()) == sorted(teacher)
        assert exported.metadata()["step"] == "6"
        for name in teacher:
            assert torch.equal(exported.get_tensor(name), teacher[name]), name
    assert any(name.startswith("backbones.s1.blocks.0.attn.qkv") for name in teacher)
    assert any(name.startswith("fusion.") for name in teacher)
    assert "fuse_alg: xattn" in out.with_suffix(".yaml").read_text()

    encoder = load_exported_encoder(out)
    images = {"s1": torch.randn(2, 2, 32, 32), "s2": torch.randn(2, 13, 32, 32)}
    with torch.no_grad():
        tokens = encoder(images)["x_norm_clstoken"]
    assert tokens.shape == (2, 32) and torch.isfinite(tokens).all()
    assert not encoder.training


def test_export_from_s3_checkpoints_of_an_older_step(
    tmp_path: Path, bucket: str, s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"s3://{bucket}/ckpt"
    storage = [f"train.storage.endpoint_url={s3_env}", "train.storage.path_style=true"]
    train(tiny_config(f"checkpoint.dir={uri}", *storage), tmp_path / "run")
    out = tmp_path / "t4.safetensors"
    code, stdout, _ = _export(
        capsys, "--output-dir", str(tmp_path / "run"), "--step", "4", "--out", str(out)
    )
    assert code == 0 and "step 4" in stdout and uri in stdout
    encoder = load_exported_encoder(out)
    assert set(encoder.backbones) == {"s2"}


def test_export_and_eval_pick_a_step_alike_naming_the_complete_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One step selection serves export, evaluation and --resume-from-step."""
    for step in (2, 4):
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / MARKER).write_text("{}")
    (tmp_path / checkpoint_name(3)).mkdir()
    (tmp_path / checkpoint_name(3) / "__0_0.distcp").write_bytes(b"")  # partial: no marker
    expected = (
        f"--step 3: file://{tmp_path}/{checkpoint_name(3)} is not a complete checkpoint; complete "
        "ones are at steps 2, 4"
    )
    out = tmp_path / "x.safetensors"
    code, _, err = _export(
        capsys, "--checkpoint-dir", str(tmp_path), "--step", "3", "--out", str(out)
    )
    assert code == ExitCode.CHECKPOINT and expected in err and not out.exists()
    with pytest.raises(CheckpointError) as raised:
        load_eval_model(str(tmp_path), step=3)
    assert str(raised.value) == expected


def test_export_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _export(capsys, "--checkpoint-dir", str(tmp_path), "--out", "x.safetensors")
    assert code == ExitCode.CHECKPOINT and "no complete checkpoint in" in err
    code, _, err = _export(capsys, "--output-dir", str(tmp_path), "--out", "x.safetensors")
    assert code == 1 and "no config.yaml" in err
    not_export = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(not_export))
    with pytest.raises(RsdinoError, match="not an rsdino teacher export"):
        load_exported_encoder(not_export)


def test_export_is_readable_and_says_how_to_normalise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(tiny_config(), run)
    out = tmp_path / "exports" / "teacher.safetensors"
    previous = os.umask(0o022)
    try:
        with caplog.at_level("INFO"):
            code, _, _ = _export(capsys, "--output-dir", str(run), "--out", str(out))
    finally:
        os.umask(previous)
    assert code == 0
    # 0666 minus the umask, like any file a user writes: readable on shared storage.
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "exports" / "teacher.yaml").stat().st_mode) == 0o644
    with safe_open(str(out), framework="pt") as exported:
        band_stats = json.loads(exported.metadata()["band_stats"])
    mean, std = rsdino_band_stats("s2", "sen12ms")
    assert band_stats["modalities"] == {
        "s2": {"bands": list(S2_BANDS_SEN12MS), "mean": mean, "std": std}
    }
    assert "default" in band_stats["source"] and "(x - mean) / std" in band_stats["normalise"]
    assert "teacher.yaml" in caplog.text and "metadata key 'band_stats'" in caplog.text


def test_band_stats_of_picked_geotiff_bands_and_of_a_stats_file(tmp_path: Path) -> None:
    config = tiny_config(
        "train.dataset.source=geotiff",
        "train.dataset.uri=/data/tiles",
        "train.dataset.bands=[4,3,2]",
        "student.in_chans=3",
    )
    document, source = _band_stats(config_to_yaml(config))
    entry = json.loads(document)["modalities"]["s2"]
    mean, std = rsdino_band_stats("s2", "sen12ms")
    assert entry == {"bands": ["B4", "B3", "B2"], "mean": mean[3:0:-1], "std": std[3:0:-1]}
    assert "default" in source
    missing = str(tmp_path / "gone" / "band_stats.json")
    assert _band_stats(config_to_yaml(tiny_config(f"train.dataset.stats={missing}"))) == (
        None,
        None,
    )


def test_unusable_out_fails_before_reading_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No checkpoint at all: had the checkpoint been read first, the error would say so.
    empty = str(tmp_path / "no_checkpoints")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    cases = {
        a_file / "teacher.safetensors": f"{a_file} is a file, not a folder",
        folder: f"{folder} is a folder; pass a file name",
        Path("/sys/teacher.safetensors"): "Permission denied",
        tmp_path / "teacher.yaml": "would be overwritten by its config",
    }
    for out, message in cases.items():
        code, _, err = _export(capsys, "--checkpoint-dir", empty, "--out", str(out))
        assert code == 4 and len(err.strip().splitlines()) == 1, err
        assert str(out) in err and message in err, err
        assert "no complete checkpoint" not in err


def test_a_run_config_from_another_version_is_a_clear_error() -> None:
    stored = OmegaConf.create(config_to_yaml(tiny_config()))
    assert isinstance(untrained_encoder(stored), RemoteSensingEncoder)
    stored.student.renamed_option = 1  # a key this version does not know
    with pytest.raises(ConfigError, match=r"student config does not fit.*renamed_option"):
        untrained_encoder(stored)
