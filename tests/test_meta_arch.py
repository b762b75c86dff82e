"""The DINOv2 step on a tiny model: pairing of views, loss composition, teacher EMA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_config

from rsdino.data.masking import sample_ibot_masks
from rsdino.ssl.meta_arch import SSLBatch, SSLMetaArch

BATCH = 3


def _model(*overrides: str) -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(tiny_config(*overrides)).train()


def _batch(masks=None, n_local: int = 2) -> SSLBatch:
    generator = torch.Generator().manual_seed(1)
    global_crops = torch.randn(2 * BATCH, 13, 32, 32, generator=generator)
    local_crops = torch.randn(n_local * BATCH, 13, 16, 16, generator=generator)
    return SSLBatch(
        global_crops={"s2": global_crops},
        local_crops={"s2": local_crops} if n_local else None,
        masks=masks,
    )


def _masks(probability: float = 0.5):
    return sample_ibot_masks(
        2 * BATCH, (4, 4), (0.1, 0.5), probability, torch.Generator().manual_seed(2)
    )


def test_teacher_starts_as_student_and_gets_no_gradient() -> None:
    model = _model()
    for (name, s), (_, t) in zip(
        model.student.named_parameters(), model.teacher.named_parameters(), strict=True
    ):
        assert torch.equal(s, t), name
        assert not t.requires_grad
    total, _ = model.compute_losses(_batch(_masks()), teacher_temp=0.04)
    total.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    blocks = model.student["encoder"].backbones["s2"].blocks
    assert all(p.grad is not None for p in blocks.parameters())


def test_parts_sum_to_total_and_are_finite() -> None:
    model = _model()
    total, parts = model.compute_losses(_batch(_masks()), teacher_temp=0.04)
    assert set(parts) == {"dino_global", "dino_local", "koleo", "ibot"}
    assert torch.allclose(sum(parts.values()), total.detach())
    assert all(torch.isfinite(v) for v in parts.values())


def test_each_view_is_taught_by_the_other_view() -> None:
    model = _model()
    batch = _batch()
    center_before = model.dino_loss.center.clone()
    targets = model.teacher_targets(batch, None, teacher_temp=0.05)
    with torch.no_grad():
        view1 = {"s2": batch.global_crops["s2"][BATCH:]}
        cls = model.teacher["encoder"](view1)["x_norm_clstoken"]
        logits = model.teacher["dino_head"](cls)
    expected = F.softmax((logits - center_before) / 0.05, dim=-1)
    assert torch.allclose(targets.dino[0], expected, atol=1e-6)
    assert not torch.equal(model.dino_loss.center, center_before), "the centre was updated"


def test_dino_global_matches_hand_formula_without_locals() -> None:
    """With no local crops the global term is the mean cross-entropy over both swapped pairs."""
    model = _model(
        "crops.local_crops_number=0",
        "ibot.loss_weight=0",
        "dino.koleo_loss_weight=0",
        "student.drop_path_rate=0",
    )
    batch = _batch(n_local=0)
    center = model.dino_loss.center.clone()
    total, parts = model.compute_losses(batch, teacher_temp=0.04)
    with torch.no_grad():
        t = model.teacher["dino_head"](
            model.teacher["encoder"](batch.global_crops)["x_norm_clstoken"]
        )
        s = model.student["dino_head"](
            model.student["encoder"](batch.global_crops)["x_norm_clstoken"]
        )
    t = torch.cat(t.chunk(2)[::-1])
    p_teacher = F.softmax((t - center) / 0.04, dim=-1)
    ce = -(p_teacher * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()
    assert set(parts) == {"dino_global"}
    assert torch.allclose(total.detach(), ce, rtol=1e-5)


def test_no_masked_patch_gives_zero_ibot_not_nan() -> None:
    model = _model()
    total, parts = model.compute_losses(_batch(_masks(probability=0.0)), teacher_temp=0.04)
    assert parts["ibot"] == 0
    assert torch.isfinite(total)


def test_sinkhorn_and_separate_head_variants_train() -> None:
    model = _model(
        "train.centering=sinkhorn_knopp",
        "ibot.separate_head=true",
        "ibot.head_n_prototypes=32",
        "ibot.head_hidden_dim=32",
        "ibot.head_bottleneck_dim=16",
    )
    assert "ibot_head" in model.student and "ibot_head" in model.teacher
    total, _ = model.compute_losses(_batch(_masks()), teacher_temp=0.04)
    total.backward()
    assert torch.isfinite(total)
    assert model.student["ibot_head"].last_layer.weight_v.grad is not None


def test_ema_update_moves_teacher_towards_student() -> None:
    model = _model()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(momentum=0.75)
    for old, new, s in zip(
        before, model.teacher.parameters(), model.student.parameters(), strict=True
    ):
        assert torch.allclose(new, 0.75 * old + 0.25 * s)


def test_pretrained_rgb_backbone_initialises_student_and_teacher(tmp_path) -> None:
    from rsdino.models.vit import build_vit

    rgb = build_vit(
        "vit_small", img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2
    )
    path = tmp_path / "dinov2_rgb.pth"
    torch.save(rgb.state_dict(), path)
    model = _model(f"student.pretrained_weights={path}")
    got = model.student["encoder"].backbones["s2"].patch_embed.proj.weight
    expected = rgb.patch_embed.proj.weight.mean(dim=1, keepdim=True) * 3 / 13
    assert torch.allclose(got, expected.expand_as(got))
    teacher_qkv = model.teacher["encoder"].backbones["s2"].blocks[0].attn.qkv.weight
    assert torch.equal(teacher_qkv, rgb.blocks[0].attn.qkv.weight)


def test_missing_pretrained_weights_is_a_clear_error(tmp_path) -> None:
    import pytest

    from rsdino.errors import RsdinoError

    with pytest.raises(RsdinoError, match=r"student\.pretrained_weights=.*nope\.pth.* s2 encoder"):
        _model(f"student.pretrained_weights={tmp_path / 'nope.pth'}")


def _weighted(model: SSLMetaArch, weights: list[float], n_local: int = 2) -> dict:
    """Loss parts with per-sample view weights (both global views and every local crop alike)."""
    batch = _batch(_masks(probability=1.0), n_local=n_local)
    per_sample = torch.tensor(weights)
    batch.global_weight = per_sample.repeat(2)
    batch.local_weight = per_sample.repeat(n_local)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)  # the same stochastic-depth draws in every call
    _, parts = model.compute_losses(batch, teacher_temp=0.04)
    model.load_state_dict(state)  # the centres moved: every call starts from the same state
    return parts


def test_view_weights_scale_the_dino_and_ibot_terms_of_their_samples() -> None:
    model = _model()
    plain = _weighted(model, [1.0, 1.0, 1.0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    _, unweighted = model.compute_losses(_batch(_masks(probability=1.0)), teacher_temp=0.04)
    model.load_state_dict(state)
    for name in unweighted:
        torch.testing.assert_close(plain[name], unweighted[name])  # weight 1 changes nothing
    zero, half = _weighted(model, [1.0, 0.0, 1.0]), _weighted(model, [1.0, 0.5, 1.0])
    # Sample 1's terms scale linearly with its weight; every other term is untouched.
    for name in ("dino_global", "dino_local", "ibot"):
        torch.testing.assert_close(half[name], (zero[name] + plain[name]) / 2)
        assert zero[name] < plain[name]
    torch.testing.assert_close(zero["koleo"], plain["koleo"])  # KoLeo is not weighted
    nothing = _weighted(model, [0.0, 0.0, 0.0])
    for name in ("dino_global", "dino_local", "ibot"):
        assert nothing[name] == 0
