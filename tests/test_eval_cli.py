"""`rsdino eval ...` and `rsdino attention` end to end on tiny trained and exported teachers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_multimodal_config
from PIL import Image
from source_fixtures import write_bigearthnet_patch, write_eurosat, write_geotiff, write_seg_tile

from rsdino.cli import main
from rsdino.config.loader import ConfigError
from rsdino.eval.attention import attention_weights, cls_attention_maps, last_block_inputs
from rsdino.eval.commands import class_options
from rsdino.eval.features import extract_features
from rsdino.eval.model import load_eval_model
from rsdino.eval.synthetic import synthetic_splits
from rsdino.export import checkpoints_of_run, export_teacher
from rsdino.train.loop import train

TINY = ["student.embed_dim=64", "optim.epochs=1", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A unimodal and a multimodal run (3 steps each) and their exported teachers."""
    root = tmp_path_factory.mktemp("models")
    found = {}
    for name, cfg in (("uni", tiny_config(*TINY)), ("mm", tiny_multimodal_config(*TINY))):
        train(cfg, root / name, resume=False)
        found[f"{name}_run"] = root / name
        found[name] = export_teacher(
            checkpoints_of_run(root / name), root / f"{name}.safetensors"
        ).path
    return found


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_knn_on_eurosat_writes_report_beside_export(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_eurosat(tmp_path / "eurosat", {"Forest": 12, "River": 12, "Urban": 12}, size=32)
    args = ["eval", "knn", str(models["uni"]), "--dataset", "eurosat"]
    code, out, err = _cli(
        capsys, *args, "--data", str(tmp_path / "eurosat"), "--tile-size", "32", "--k", "5,10"
    )
    assert code == 0, err
    assert "k=5 accuracy" in out and "k=10 accuracy" in out and "s2" in out
    assert "s2 train" in err  # progress goes to stderr
    report_path = models["uni"].parent / "uni.eval_knn.json"
    report = json.loads(report_path.read_text())
    assert report["dataset"]["classes"] == ["Forest", "River", "Urban"]
    assert report["dataset"]["sizes"] == {"train": 27, "val": 3, "test": 6}
    # The bands differ per class (write_eurosat), so even a 3-step teacher separates them.
    assert report["results"]["s2"]["k=5"]["accuracy"] > 0.6
    for metrics in report["results"]["s2"].values():  # per k: which class went where
        confusion = metrics["confusion"]
        assert len(confusion) == 3 and sum(map(sum, confusion)) == 6
        assert sum(confusion[c][c] for c in range(3)) / 6 == pytest.approx(metrics["accuracy"])
    assert "confusion" not in out  # the table shows scalars; the matrix is in the report


def test_multimodal_checkpoint_runs_all_three_modes_and_caches(
    models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "report.json"
    args = ["eval", "linear", str(models["mm_run"]), "--dataset", "synthetic"]
    args += ["--synthetic-counts", "48,16,24", "--epochs", "3", "--lrs", "0.01,0.1"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    code, stdout, err = _cli(capsys, *args)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["s1+s2", "s2", "s1"]
    for mode in ("s1+s2", "s2", "s1"):
        assert mode in stdout
        assert 0.0 <= report["results"][mode]["best"]["test"]["accuracy"] <= 1.0
        assert len(report["results"][mode]["grid"]) == 4  # 2 feature sets x 2 learning rates
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 9  # 3 modes x 3 splits

    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr("rsdino.eval.run.extract_features", no_extraction)
    code, _, err = _cli(capsys, *args)
    assert code == 0, err
    assert json.loads(out.read_text())["results"] == report["results"]


def test_missing_modality_token_replaces_the_absent_sensor(models: dict[str, Path]) -> None:
    model = load_eval_model(str(models["mm"]))
    splits = synthetic_splits("scene", counts=(4, 1, 1), tile_size=32, num_classes=6)

    class NoisySar(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> dict:
            sample = dict(splits.train[index])
            sample["s1"] = np.random.default_rng(index).normal(-15, 5, (2, 32, 32)).astype("f4")
            return sample

    normalizers = model.normalizers()
    both = extract_features(model.encoder, splits.train, normalizers, mode="s1+s2")
    s2_only = extract_features(model.encoder, splits.train, normalizers, mode="s2")
    s2_noisy_sar = extract_features(model.encoder, NoisySar(), normalizers, mode="s2")
    both_noisy_sar = extract_features(model.encoder, NoisySar(), normalizers, mode="s1+s2")
    assert torch.allclose(s2_only["cls"], s2_noisy_sar["cls"], atol=1e-5)  # SAR input unused
    assert not torch.allclose(both["cls"], both_noisy_sar["cls"], atol=1e-3)  # SAR input used
    assert not torch.allclose(s2_only["cls"], both["cls"], atol=1e-3)


def test_segmentation_and_multilabel_commands(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for i in range(10):
        mask = (rng.random((16, 16)) > 0.5).astype(np.uint8)
        write_seg_tile(tmp_path / "seg", f"tile{i}", mask)
    code, out, err = _cli(
        capsys, "eval", "segmentation", str(models["mm"]), "--dataset", "segmentation",
        "--data", str(tmp_path / "seg"), "--num-classes", "2", "--epochs", "2", "--lrs", "0.01",
        "--out", str(tmp_path / "seg.json"), "--no-cache",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "seg.json").read_text())
    assert list(report["results"]) == ["s1+s2", "s2", "s1"]
    test = report["results"]["s2"]["best"]["test"]
    assert len(test["per_class_iou"]) == 2 and 0.0 <= test["miou"] <= 1.0
    assert "mIoU" in out and "per-class IoU" in out

    rows = ["patch_id,labels"]
    for i in range(10):
        write_bigearthnet_patch(tmp_path / "ben", f"P{i}", 500 + 100 * i, with_s1=False)
        rows.append(f"P{i},{'Arable land' if i % 2 else 'Arable land;Inland waters'}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    code, out, err = _cli(
        capsys, "eval", "logreg", str(models["uni"]), "--dataset", "bigearthnet",
        "--data", str(tmp_path / "ben"), "--labels", str(tmp_path / "meta.csv"),
        "--tile-size", "16", "--test-fraction", "0.4", "--val-fraction", "0.2", "--no-cache",
        "--l2", "1e-3,1e-1",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((models["uni"].parent / "uni.eval_logreg_multilabel.json").read_text())
    assert set(report["results"]["s2"]["best"]["test"]) == {"map_macro", "map_micro"}
    assert "map_macro" in out


def test_bad_inputs_give_one_line_errors(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_eurosat(tmp_path / "eurosat", {"Forest": 3, "River": 3}, size=16)
    data = ["--data", str(tmp_path / "eurosat")]
    cases = [
        (["eval", "knn", str(tmp_path / "none.safetensors"), "--dataset", "synthetic"], 4,
         "does not exist"),
        (["eval", "knn", str(models["uni"]), "--dataset", "eurosat"], 2, "needs --data"),
        (["eval", "segmentation", str(models["uni"]), "--dataset", "eurosat", *data], 2,
         "does not apply to scene data"),
        (["eval", "knn", str(models["uni"]), "--dataset", "eurosat", *data, "--no-cache"], 3,
         "Forest_1.tif: is 16x16 pixels, expected 64x64"),
        (["eval", "linear", str(models["uni"]), "--dataset", "synthetic", "--modes", "s1"], 2,
         "not possible for this model"),
    ]  # fmt: skip
    for args, expected_code, message in cases:
        code, _, err = _cli(capsys, *args)
        assert code == expected_code, (args, err)
        assert message in err and err.count("\n") == 1, err


def test_attention_weights_reproduce_the_real_block(models: dict[str, Path]) -> None:
    encoder = load_eval_model(str(models["mm"])).encoder
    backbone = encoder.backbones["s2"]
    x = torch.randn(2, 13, 32, 32)
    block, tokens = last_block_inputs(backbone, x)
    weights, values = attention_weights(block, tokens)
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    batch, count, dim = tokens.shape
    mixed = (weights @ values).transpose(1, 2).reshape(batch, count, dim)
    with torch.no_grad():
        expected = block.attn(block.norm1(tokens))  # the model's own SDPA path
        assert torch.allclose(block.attn.proj(mixed), expected, atol=1e-5)
        full = backbone.forward_features(x)["x_prenorm"]
        assert torch.allclose(block(tokens), full, atol=1e-5)  # the inputs are the real ones
    maps = cls_attention_maps(backbone, x)
    assert maps.shape == (2, backbone.blocks[-1].attn.num_heads, 4, 4)


def test_attention_command_writes_pngs(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = synthetic_splits("scene", counts=(1, 1, 1), tile_size=32).train[0]
    write_geotiff(tmp_path / "s2.tif", sample["s2"])
    write_geotiff(tmp_path / "s1.tif", sample["s1"])
    out = tmp_path / "maps"
    code, stdout, err = _cli(
        capsys, "attention", str(models["mm"]), str(tmp_path / "s2.tif"),
        "--s1", str(tmp_path / "s1.tif"), "--out", str(out), "--scale", "3",
    )  # fmt: skip
    assert code == 0, err
    heads = 2  # tiny config
    for modality in ("s2", "s1"):
        names = [f"{modality}_input", *(f"{modality}_head{h}" for h in range(heads))]
        for name in [*names, f"{modality}_mean"]:
            with Image.open(out / f"{name}.png") as image:
                assert image.size == (96, 96) and image.mode == "RGB"
                assert np.asarray(image).std() > 1.0
        assert f"{modality}: {heads + 2} PNGs" in stdout
    maps = np.load(out / "attention.npz")
    for modality in ("s2", "s1"):
        assert maps[modality].shape == (heads, 4, 4)
        assert maps[modality].std(axis=(1, 2)).min() > 0  # no head's map is constant
    with Image.open(out / "s2_input.png") as rgb, Image.open(out / "s2_mean.png") as mean:
        assert not np.array_equal(np.asarray(rgb), np.asarray(mean))
    code, _, err = _cli(capsys, "attention", str(models["uni"]), str(tmp_path / "s1.tif"),
                        "--out", str(out))  # fmt: skip
    assert code == 3 and "s1.tif: has 2 bands, expected 13" in err


def test_class_files_in_every_form(tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("water\nforest\n\n")
    assert class_options(str(tmp_path / "names.txt")) == (("water", "forest"), None)
    mapping = {"Sea and ocean": "Marine waters", "Airports": None, "Beaches": "Beaches"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    assert class_options(str(tmp_path / "map.json")) == (("Marine waters", "Beaches"), mapping)
    both = {"classes": ["Beaches", "Marine waters"], "map": mapping}
    (tmp_path / "both.json").write_text(json.dumps(both))
    assert class_options(str(tmp_path / "both.json")) == (("Beaches", "Marine waters"), mapping)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON"):
        class_options(str(tmp_path / "bad.json"))
