"""torchvision RetinaNet (v1 and v2) weights converted to our layout give torchvision's detections and losses."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops import FrozenBatchNorm2d

from model import build_retinanet, load_detector
from model.torchvision_compat import COCO_CATEGORIES, COCO_CATEGORY_IDS, convert_torchvision_state_dict
from utils.runtime.checkpoint import CheckpointError, load_state_dict_checked

# Small images keep a ResNet-50 forward of the batch around a second on two cores.
SETTINGS = dict(min_size=96, max_size=160, score_thresh=0.2, nms_thresh=0.5, detections_per_img=40,
                topk_candidates=150)
BUILDERS = {"v1": retinanet_resnet50_fpn, "v2": retinanet_resnet50_fpn_v2}


# Sizes that are multiples of neither 32 nor 128, so padding and level strides are exercised.
_generator = torch.Generator().manual_seed(2)
BATCH = [torch.rand(3, h, w, generator=_generator) for h, w in [(83, 115), (130, 100), (61, 190)]]
SINGLE = [torch.rand(3, 75, 110, generator=_generator)]


def _randomise(tv_model: nn.Module) -> None:
    """Make a weights=None torchvision RetinaNet give varied, unsaturated detections on ``BATCH``.

    Default init gives identical scores everywhere (std 0.01 head) and activations that
    grow through 16 residual blocks (BN stats 0/1), so: BN statistics measured on an
    image, then random affine and statistics noise; box outputs scaled to std 0.3 and
    the classifier so that the top 0.1% of logits lie above 0 (scores mostly 0.2-0.95:
    no float ties near 1.0 that would make the order of equal scores arbitrary).
    """
    with torch.no_grad():
        batch_norms = [m for m in tv_model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the stats of this one batch
        tv_model.eval()
        tv_model.backbone.body.train()
        tv_model.backbone.body(tv_model.transform(SINGLE)[0].tensors)  # [1, 3, 96, 160]
        tv_model.backbone.body.eval()
        for norm in batch_norms + [m for m in tv_model.head.modules() if isinstance(m, nn.GroupNorm)]:
            norm.weight.uniform_(0.7, 1.3)
            norm.bias.uniform_(-0.2, 0.2)
        for bn in batch_norms:
            bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.05)
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.2))

        cls_logits = tv_model.head.classification_head.cls_logits
        bbox_reg = tv_model.head.regression_head.bbox_reg
        # Background and "N/A" outputs exist only in torchvision's 91-way classifier; trained
        # COCO weights never fire them, so they must not produce detections here either.
        bias = torch.full((9, 91), -30.0)
        bias[:, COCO_CATEGORY_IDS] = -3.0
        cls_logits.bias.copy_(bias.reshape(-1))
        outputs = tv_model.head(list(tv_model.backbone(tv_model.transform(BATCH)[0].tensors).values()))
        varying_part = outputs["cls_logits"][..., COCO_CATEGORY_IDS] + 3.0
        cls_logits.weight.mul_(3.0 / torch.quantile(varying_part.flatten(), 0.999))
        bbox_reg.weight.mul_(0.3 / outputs["bbox_regression"].std())


@pytest.fixture(scope="module", params=["v1", "v2"])
def models(request):
    """(torchvision model, our converted model), both in eval mode with ``SETTINGS``."""
    torch.manual_seed(1)
    tv_model = BUILDERS[request.param](weights=None, weights_backbone=None, num_classes=91, **SETTINGS)
    _randomise(tv_model)
    tv_model.version = request.param
    state, config = convert_torchvision_state_dict(tv_model.state_dict())
    model = build_retinanet(**{**config, **SETTINGS})
    load_state_dict_checked(model, state, "converted")
    return tv_model.eval(), model.eval()


def test_coco_categories_are_the_80_real_ones_in_id_order():
    assert len(COCO_CATEGORIES) == 80
    assert COCO_CATEGORY_IDS == sorted(COCO_CATEGORY_IDS) and len(set(COCO_CATEGORY_IDS)) == 80
    assert COCO_CATEGORIES[0] == {"id": 1, "name": "person"}
    assert COCO_CATEGORIES[-1] == {"id": 90, "name": "toothbrush"}
    assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(COCO_CATEGORY_IDS)  # the N/A ids


def test_configuration_follows_the_weights(models):
    tv_model, _ = models
    _, config = convert_torchvision_state_dict(tv_model.state_dict())
    expected = {"v1": ("p5", None, "l1"), "v2": ("c5", "gn", "giou")}[tv_model.version]
    assert (config["p6_from"], config["head_norm"], config["box_loss"]) == expected
    assert config["backbone"] == "resnet50" and config["backbone_norm"] == "frozen_bn"
    assert config["num_classes"] == 80 and config["size_divisible"] == 32


def test_classifier_keeps_one_row_per_anchor_and_coco_category(models):
    tv_model, _ = models
    state, _ = convert_torchvision_state_dict(tv_model.state_dict())
    tv_weight = tv_model.head.classification_head.cls_logits.weight
    tv_bias = tv_model.head.classification_head.cls_logits.bias
    for anchor in (0, 4, 8):
        for label, cat_id in [(0, 1), (16, 18), (79, 90)]:
            assert torch.equal(state["head.cls_logits.weight"][anchor * 80 + label], tv_weight[anchor * 91 + cat_id])
            assert state["head.cls_logits.bias"][anchor * 80 + label] == tv_bias[anchor * 91 + cat_id]
    state_91, config_91 = convert_torchvision_state_dict(tv_model.state_dict(), coco_contiguous=False)
    assert config_91["num_classes"] == 91 and torch.equal(state_91["head.cls_logits.weight"], tv_weight)


def _to_pre_013_layout(key: str, head: bool) -> str:
    """torchvision < 0.13 names: FPN blocks were bare convs, (norm-free) heads Sequential(conv, ReLU, ...)."""
    key = re.sub(r"(inner_blocks|layer_blocks)\.(\d+)\.0\.", r"\1.\2.", key)
    if head:
        key = re.sub(r"_head\.conv\.(\d+)\.0\.", lambda m: f"_head.conv.{2 * int(m.group(1))}.", key)
    return key


def test_old_torchvision_key_layout_converts_to_the_same_tensors(models):
    tv_model, _ = models
    old_head = tv_model.version == "v1"  # GroupNorm heads only exist in the new layout
    state = tv_model.state_dict()
    old_state = {_to_pre_013_layout(k, old_head): v for k, v in state.items()}
    assert "backbone.fpn.inner_blocks.0.weight" in old_state
    assert ("head.classification_head.conv.6.weight" in old_state) == old_head
    new, new_config = convert_torchvision_state_dict(state)
    old, old_config = convert_torchvision_state_dict(old_state)
    assert new_config == old_config and new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)


def _compare_detections(tv_detections, our_detections):
    to_coco_id = torch.tensor(COCO_CATEGORY_IDS)
    for tv_det, our_det in zip(tv_detections, our_detections):
        assert len(tv_det["scores"]) >= 20  # a meaningful comparison, not two empty lists
        assert len(our_det["scores"]) == len(tv_det["scores"])
        assert torch.equal(to_coco_id[our_det["labels"]], tv_det["labels"])
        torch.testing.assert_close(our_det["scores"], tv_det["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(our_det["boxes"], tv_det["boxes"], atol=1e-2, rtol=0)


def test_detections_match_torchvision(models):
    tv_model, model = models
    with torch.no_grad():
        _compare_detections(tv_model(BATCH), model(BATCH))


def test_training_losses_match_torchvision(models):
    tv_model, model = models
    boxes = torch.tensor([[10.0, 20.0, 80.0, 90.0], [50.0, 30.0, 150.0, 100.0], [5.0, 5.0, 30.0, 60.0]])
    coco_ids = torch.tensor([1, 18, 90])  # person, dog, toothbrush
    labels = torch.tensor([COCO_CATEGORY_IDS.index(int(i)) for i in coco_ids])
    # Frozen statistics on both sides: ours is built with frozen BN, torchvision's BN stays in eval.
    tv_model.train()
    tv_model.backbone.body.eval()
    model.train()
    try:
        with torch.no_grad():
            tv_losses = tv_model(SINGLE, [{"boxes": boxes, "labels": coco_ids}])
            our_losses = model(SINGLE, [{"boxes": boxes, "labels": labels}])
    finally:
        tv_model.eval()
        model.eval()
    assert set(our_losses) == set(tv_losses)
    for name in tv_losses:
        assert tv_losses[name] > 0
        torch.testing.assert_close(our_losses[name], tv_losses[name], rtol=1e-4, atol=0)


def test_backbone_eps_is_folded_into_frozen_statistics(models):
    # torchvision runs its v1 COCO weights with BatchNorm eps 0; we keep FrozenBatchNorm2d's 1e-5.
    tv_model, _ = models
    state, _ = convert_torchvision_state_dict(tv_model.state_dict(), backbone_bn_eps=0.0)
    body = tv_model.backbone.body
    for name in ("bn1", "layer2.0.downsample.1", "layer4.2.bn3"):
        bn = body.get_submodule(name)
        frozen = FrozenBatchNorm2d(bn.num_features)
        frozen.load_state_dict({k: state[f"backbone.body.{name}.{k}"]
                                for k in ("weight", "bias", "running_mean", "running_var")})
        x = torch.randn(2, bn.num_features, 3, 3)
        expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=0.0)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)


def test_state_dicts_of_other_models_are_refused():
    with pytest.raises(CheckpointError, match="not a torchvision RetinaNet"):
        convert_torchvision_state_dict({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="predicts 3 classes per anchor"):
        convert_torchvision_state_dict(_tiny_torchvision_like_state(num_classes=3), source="x.pth")
    state = _tiny_torchvision_like_state(num_classes=91)
    state["head.classification_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"x\.pth has 1 keys that are not part"):
        convert_torchvision_state_dict(state, source="x.pth")


def _tiny_torchvision_like_state(num_classes: int) -> dict:
    """Just the keys the converter inspects, with a ResNet-50 layout and 9 anchors."""
    state = {"backbone.body.conv1.weight": torch.zeros(64, 3, 7, 7),
             "backbone.body.layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3),
             "backbone.body.layer1.0.conv3.weight": torch.zeros(256, 64, 1, 1)}
    for stage, blocks in zip(range(2, 5), (4, 6, 3)):
        for block in range(blocks):
            state[f"backbone.body.layer{stage}.{block}.conv1.weight"] = torch.zeros(1)
    for block in range(1, 3):
        state[f"backbone.body.layer1.{block}.conv1.weight"] = torch.zeros(1)
    for i, channels in enumerate((512, 1024, 2048)):
        state[f"backbone.fpn.inner_blocks.{i}.0.weight"] = torch.zeros(256, channels, 1, 1)
    state["backbone.fpn.extra_blocks.p6.weight"] = torch.zeros(256, 256, 3, 3)
    state["backbone.fpn.extra_blocks.p7.weight"] = torch.zeros(256, 256, 3, 3)
    state["head.classification_head.cls_logits.weight"] = torch.zeros(9 * num_classes, 256, 3, 3)
    state["head.classification_head.cls_logits.bias"] = torch.zeros(9 * num_classes)
    state["head.regression_head.bbox_reg.weight"] = torch.zeros(36, 256, 3, 3)
    return state



def test_an_option_given_explicitly_overrides_the_weights_even_at_our_default(models, tmp_path):
    """``detections_per_img=100`` is our default but not torchvision's (300): given explicitly, it applies,
    and the converted model detects exactly what torchvision's own model built with that value does."""
    tv_model, _ = models
    path = tmp_path / "tv.pth"
    torch.save(tv_model.state_dict(), path)
    settings = {**SETTINGS, "score_thresh": 0.05, "topk_candidates": 1000}
    tv_capped = BUILDERS[tv_model.version](weights=None, weights_backbone=None, num_classes=91,
                                           **{**settings, "detections_per_img": 100})
    tv_capped.load_state_dict(tv_model.state_dict())
    ours, _ = load_detector(str(path), **{**settings, "detections_per_img": 100})
    uncapped, _ = load_detector(str(path), **{k: v for k, v in settings.items() if k != "detections_per_img"})
    assert ours.detections_per_img == 100 and uncapped.detections_per_img == 300  # torchvision's own default
    with torch.no_grad():
        expected, got, more = tv_capped.eval()(BATCH), ours(BATCH), uncapped(BATCH)
    for tv_det, det, det_300 in zip(expected, got, more):
        assert len(tv_det["scores"]) == len(det["scores"]) == 100 < len(det_300["scores"])
        torch.testing.assert_close(det["scores"], tv_det["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(det["boxes"], tv_det["boxes"], rtol=0, atol=1e-2)
