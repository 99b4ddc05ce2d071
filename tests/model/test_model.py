import math

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from model import BACKBONES, build_retinanet
from model.fpn import FPN
from model.head import RetinaNetHead

SMALL = dict(min_size=64, max_size=96)


def one_target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def empty_target():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_gives_finite_losses(backbone):
    model = build_retinanet(num_classes=3, backbone=backbone, fpn_channels=64, head_convs=1, **SMALL)
    model.train()
    losses = model([torch.rand(3, 64, 80)], [one_target([[5, 5, 40, 50]], [1])])
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_image_without_boxes_has_zero_box_loss_and_positive_cls_loss():
    model = build_retinanet(num_classes=2, backbone="resnet18", **SMALL).train()
    losses = model([torch.rand(3, 64, 64)], [empty_target()])
    assert losses["bbox_regression"].item() == 0.0
    assert losses["classification"].item() > 0


@pytest.mark.parametrize("target,message", [
    (one_target([[10, 10, 5, 20]], [0]), "degenerate box"),
    (one_target([[10, 10, 20, 10]], [0]), "degenerate box"),
    (one_target([[1, 1, 5, 5]], [7]), "labels must lie in"),
    ({"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)}, r"boxes must be \[N, 4\]"),
    ({"boxes": torch.zeros(0, 4)}, "needs 'boxes' and 'labels'"),
    ({"boxes": torch.tensor([[0.0, 0, float("nan"), 4]]), "labels": torch.zeros(1, dtype=torch.long)}, "NaN"),
])
def test_invalid_targets_raise_clear_errors(target, message):
    model = build_retinanet(num_classes=2, backbone="resnet18", **SMALL).train()
    with pytest.raises(ValueError, match=message):
        model([torch.rand(3, 32, 32)], [target])


def test_missing_targets_and_bad_images_raise():
    model = build_retinanet(num_classes=2, backbone="resnet18", **SMALL).train()
    with pytest.raises(ValueError, match="targets are required"):
        model([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        model.eval()([torch.rand(1, 32, 32)])


def test_eval_boxes_in_original_image_frame_and_bounds():
    # A high prior makes the untrained head fire everywhere, so there is plenty to check.
    model = build_retinanet(num_classes=3, backbone="resnet18", prior_prob=0.5, min_size=96, max_size=160).eval()
    images = [torch.rand(3, 50, 120), (torch.rand(3, 200, 70) * 255).to(torch.uint8)]
    with torch.no_grad():
        detections = model(images)
    for image, det in zip(images, detections):
        assert 0 < len(det["boxes"]) <= 100
        height, width = image.shape[-2:]
        boxes = det["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        assert det["labels"].dtype == torch.int64 and det["labels"].max() < 3


def test_crowd_region_turns_background_anchors_into_ignored():
    model = build_retinanet(num_classes=2, backbone="resnet18", **SMALL).train()
    image = torch.rand(3, 64, 64)
    target = one_target([[2, 2, 20, 20]], [0])
    crowd = dict(target, crowd_boxes=torch.tensor([[30.0, 30, 64, 64]]))
    torch.manual_seed(0)
    plain = model([image], [target])
    torch.manual_seed(0)
    with_crowd = model([image], [crowd])
    # Fewer anchors count as background, so the summed classification loss drops; boxes are untouched.
    assert with_crowd["classification"] < plain["classification"]
    torch.testing.assert_close(with_crowd["bbox_regression"], plain["bbox_regression"])


@pytest.mark.parametrize("cls_loss", ["focal", "ce", "ohem"])
def test_ignored_anchors_contribute_exactly_nothing(cls_loss):
    """An anchor in a crowd region or in the IoU band between the thresholds (0.4-0.5) is ignored:
    any logit or delta there leaves both losses bit for bit; a foreground or background anchor's does not."""
    anchors = torch.tensor([[2.0, 2, 20, 20],    # 0: foreground (IoU 1 with the object)
                            [34.0, 34, 50, 50],  # 1: inside the crowd region (IoA 1): ignored
                            [6.0, 6, 24, 24],    # 2: IoU 0.43 with the object: ignored
                            [0.0, 40, 16, 56],   # 3: background
                            [20.0, 20, 40, 40]])  # 4: background (IoA 0.25 with the crowd region, under 0.5)
    target = dict(one_target([[2, 2, 20, 20]], [1]), crowd_boxes=torch.tensor([[30.0, 30, 64, 64]]))
    criterion = model_loss(num_classes=2, cls_loss=cls_loss)
    logits, deltas = torch.randn(1, 5, 2), torch.randn(1, 5, 4) * 0.1

    def losses(changed_anchor=None):
        new_logits, new_deltas = logits.clone(), deltas.clone()
        if changed_anchor is not None:
            new_logits[0, changed_anchor] = torch.tensor([7.0, -7.0])
            new_deltas[0, changed_anchor] += 0.5
        return criterion(new_logits, new_deltas, anchors, [target])

    reference = losses()
    assert reference["classification"] > 0 and reference["bbox_regression"] > 0
    for ignored in (1, 2):
        changed = losses(ignored)
        assert all(torch.equal(changed[key], reference[key]) for key in reference), ignored
    for counted in (0, 3, 4):
        assert losses(counted)["classification"] != reference["classification"], counted
    assert losses(0)["bbox_regression"] != reference["bbox_regression"]  # only foreground anchors regress
    assert losses(3)["bbox_regression"] == reference["bbox_regression"]


def model_loss(num_classes: int, cls_loss: str):
    """The loss module a default RetinaNet trains with (thresholds 0.5 / 0.4, crowd IoA 0.5)."""
    return build_retinanet(num_classes=num_classes, backbone="resnet18", cls_loss=cls_loss, **SMALL).loss


def test_model_learns_a_batch():
    torch.manual_seed(0)
    model = build_retinanet(num_classes=2, backbone="resnet18", fpn_channels=64, head_convs=2, head_norm="gn",
                            min_size=64, max_size=64).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [one_target([[8, 8, 40, 40]], [0]), one_target([[20, 10, 60, 34], [0, 40, 20, 60]], [1, 0])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(8):
        loss = sum(model(images, targets).values())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = sum(model(images, targets).values()).item()
    assert final < 0.7 * first, (first, final)


def test_fpn_levels_and_p6_source():
    c3, c4, c5 = torch.rand(1, 8, 32, 32), torch.rand(1, 16, 16, 16), torch.rand(1, 32, 8, 8)
    for p6_from, in_ch in [("c5", 32), ("p5", 24)]:
        fpn = FPN([8, 16, 32], out_channels=24, num_extra_levels=2, p6_from=p6_from)
        assert fpn.extra_convs[0].in_channels == in_ch
        shapes = [tuple(p.shape[-2:]) for p in fpn([c3, c4, c5])]
        assert shapes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(FPN([8, 16, 32], out_channels=24, num_extra_levels=0)([c3, c4, c5])) == 3


def test_head_initialisation_and_output_layout():
    head = RetinaNetHead(in_channels=32, num_anchors=9, num_classes=5, num_convs=2, norm="gn", prior_prob=0.01)
    torch.testing.assert_close(head.cls_logits.bias, torch.full((45,), -math.log(99)))
    assert head.cls_tower[0].bias is None  # GroupNorm follows
    cls, box = head([torch.rand(2, 32, 4, 6), torch.rand(2, 32, 2, 3)])
    assert cls.shape == (2, (24 + 6) * 9, 5) and box.shape == (2, (24 + 6) * 9, 4)
    # Location-major, then anchor: element [0, loc*9 + a, k] is channel a*K + k at that location.
    x = torch.rand(1, 32, 3, 3)
    cls_x, _ = head([x])
    raw = head.cls_logits(head.cls_tower(x))
    torch.testing.assert_close(cls_x[0, (1 * 3 + 2) * 9 + 4, 3], raw[0, 4 * 5 + 3, 1, 2])


def test_pretrained_backbone_from_local_file_freezes_bn_and_stem(tmp_path):
    import torchvision
    trunk = torchvision.models.resnet18()
    with torch.no_grad():
        trunk.layer1[0].conv1.weight.fill_(0.5)
    path = tmp_path / "r18.pth"
    torch.save(trunk.state_dict(), path)
    model = build_retinanet(num_classes=2, backbone="resnet18", pretrained_backbone=str(path))
    body = model.backbone.body
    assert torch.all(body.layer1[0].conv1.weight == 0.5)
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    assert "pretrained_backbone" not in model.config and model.config["backbone_norm"] == "frozen_bn"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_retinanet(num_classes=2, backbone="resnet18", pretrained_backbone=str(tmp_path / "missing.pth"))


def test_config_rebuilds_identical_architecture():
    model = build_retinanet(num_classes=4, backbone="resnet18", head_norm="gn", num_extra_levels=1,
                            anchor_base_sizes=(16, 32, 64, 128), min_size=(64, 80), max_size=128)
    clone = build_retinanet(**model.config)
    clone.load_state_dict(model.state_dict())
    assert clone.config == model.config
    model.eval(), clone.eval()
    image = torch.rand(3, 70, 90)
    with torch.no_grad():
        a, b = model([image]), clone([image])
    torch.testing.assert_close(a[0]["scores"], b[0]["scores"])
