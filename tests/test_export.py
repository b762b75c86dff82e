"""`rsdino export`: a checkpoint's teacher encoder(s) as one self-describing safetensors file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import saved_tensors, tiny_config, tiny_multimodal_config
from safetensors import safe_open

from rsdino.cli import main
from rsdino.errors import RsdinoError
from rsdino.export import load_exported_encoder
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


def test_export_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _export(capsys, "--checkpoint-dir", str(tmp_path), "--out", "x.safetensors")
    assert code == 1 and "no complete checkpoint in" in err
    code, _, err = _export(capsys, "--output-dir", str(tmp_path), "--out", "x.safetensors")
    assert code == 1 and "no config.yaml" in err
    not_export = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(not_export))
    with pytest.raises(RsdinoError, match="not an rsdino teacher export"):
        load_exported_encoder(not_export)
