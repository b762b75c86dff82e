"""Sentinel-1 + Sentinel-2 pretraining: both fusions train, missing modalities train, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import saved_tensors, tiny_multimodal_config

from rsdino.config.loader import ConfigError, load_config
from rsdino.data.masking import sample_ibot_masks
from rsdino.ssl.meta_arch import SSLBatch, SSLMetaArch
from rsdino.train.loop import train

BATCH = 3


@pytest.mark.parametrize("fuse_alg", ["linear", "xattn"])
def test_multimodal_training_runs_for_both_fusions(fuse_alg: str, tmp_path: Path) -> None:
    cfg = tiny_multimodal_config(f"student.fuse_alg={fuse_alg}", "train.modality_dropout=0.5")
    result = train(cfg, tmp_path / "run")
    assert result.final_step == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").open()]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in records)
    state = saved_tensors(tmp_path / "run" / "checkpoints", result.final_step)
    assert any(k.startswith("student.encoder.backbones.s1.blocks.") for k in state)
    assert any(k.startswith("student.encoder.fusion.") for k in state)
    assert "student.encoder.temporal.s2.proj.weight" in state


def _multimodal_batch(present: dict[str, torch.Tensor] | None) -> SSLBatch:
    generator = torch.Generator().manual_seed(0)

    def crops(rows: int, size: int) -> dict[str, torch.Tensor]:
        return {
            "s1": torch.randn(rows, 2, size, size, generator=generator),
            "s2": torch.randn(rows, 13, size, size, generator=generator),
        }

    return SSLBatch(
        global_crops=crops(2 * BATCH, 32),
        local_crops=crops(2 * BATCH, 16),
        masks=sample_ibot_masks(2 * BATCH, (4, 4), (0.1, 0.5), 0.5, generator),
        global_doy=torch.tensor([10, 100, 200] * 2),
        local_doy=torch.tensor([10, 100, 200] * 2),
        global_present=present,
        local_present=None,
    )


@pytest.mark.parametrize("missing", ["s1", "s2"])
@pytest.mark.parametrize("fuse_alg", ["linear", "xattn"])
def test_batch_without_one_modality_trains_a_step(missing: str, fuse_alg: str) -> None:
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_multimodal_config(f"student.fuse_alg={fuse_alg}")).train()
    rows = 2 * BATCH
    present = {"s1": torch.ones(rows, dtype=torch.bool), "s2": torch.ones(rows, dtype=torch.bool)}
    present[missing] = torch.zeros(rows, dtype=torch.bool)
    total, _ = model.compute_losses(_multimodal_batch(present), teacher_temp=0.04)
    total.backward()
    assert torch.isfinite(total)
    missing_token = model.student["encoder"].missing_tokens[missing]
    assert missing_token.grad is not None and missing_token.grad.abs().sum() > 0
    kept = "s2" if missing == "s1" else "s1"
    kept_blocks = model.student["encoder"].backbones[kept].blocks
    assert all(p.grad is not None for p in kept_blocks.parameters())


def test_unimodal_and_multimodal_presets_load() -> None:
    multimodal = load_config("vitl16_short_multimodal")
    assert multimodal.train.multimodal
    assert (multimodal.student.arch_s1, multimodal.student.arch_s2) == ("vit_base", "vit_base")
    assert (multimodal.crops.global_crops_size, multimodal.crops.local_crops_size) == (192, 96)
    assert multimodal.student.num_register_tokens == 2
    assert multimodal.ibot.mask_sample_probability == 0.3
    assert list(multimodal.ibot.mask_ratio_min_max) == [0.1, 0.3]
    assert load_config("vitg14").student.arch == "vit_giant2"
    assert load_config("vitg14").train.centering == "sinkhorn_knopp"  # inherited from vitl14
    assert not load_config("vitl16_short").train.multimodal


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["student.fuse_alg=concat"], r"student\.fuse_alg='concat'"),
        (["student.in_chans_s1=3"], r"student\.in_chans_s1=3 but Sentinel-1 has 2 bands"),
        (["student.xattn.nhead=5", "student.fuse_alg=xattn"], r"student\.xattn\.nhead=5"),
        (["student.arch_s2=vit_huge"], r"student\.arch_s2='vit_huge'"),
        (["student.temporal_year=true"], r"temporal_year is not supported yet"),
    ],
)
def test_multimodal_config_errors(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("quickstart_multimodal", overrides)


def test_modality_dropout_needs_multimodal() -> None:
    with pytest.raises(ConfigError, match=r"needs train\.multimodal=true"):
        load_config("quickstart", ["train.modality_dropout=0.3"])


def test_preset_base_cycle_is_an_error(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(f"base: {second}\n")
    second.write_text(f"base: {first}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(first))
