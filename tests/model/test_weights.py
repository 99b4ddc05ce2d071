"""Loading detectors from any weights spec, clear errors for unusable files, fine-tuning from COCO weights."""
import argparse
import math
import re
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection import RetinaNet, fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from model import build_retinanet
from model.torchvision_compat import COCO_CATEGORIES, convert_torchvision_state_dict
from model.weights import (WeightsUnavailableError, load_detector, load_pretrained_for_finetuning,
                           resolve_torchvision_weights)
from utils.runtime.checkpoint import CheckpointError, save_checkpoint

SMALL = dict(backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64, max_size=96)
COCO_NAMES = [c["name"] for c in COCO_CATEGORIES]


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision ``retinanet_resnet50_fpn`` (v1, 91 classes) state dict, as users download it."""
    torch.manual_seed(3)
    state = retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    path = tmp_path_factory.mktemp("tv") / "tv_retinanet_v1.pth"
    torch.save(state, path)
    return str(path), state


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """One of our (small) checkpoints trained on the 80 COCO categories."""
    torch.manual_seed(4)
    model = build_retinanet(num_classes=80, **SMALL)
    path = tmp_path_factory.mktemp("ours") / "coco_small.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": COCO_CATEGORIES,
                     "epoch": 12}, str(path))
    return str(path), model.state_dict()


def test_torchvision_file_loads_as_a_coco_detector(torchvision_file):
    path, tv_state = torchvision_file
    model, categories = load_detector(path, score_thresh=0.25)
    assert categories == COCO_CATEGORIES and model.categories == COCO_CATEGORIES
    assert not model.training and model.score_thresh == 0.25
    assert (model.config["p6_from"], model.config["head_norm"], model.config["box_loss"]) == ("p5", None, "l1")
    assert model.config["size_divisible"] == 32 and model.num_classes == 80
    expected, _ = convert_torchvision_state_dict(tv_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_load_detector_takes_the_configuration_from_the_weights(torchvision_file):
    path, _ = torchvision_file
    model, _ = load_detector(path, score_thresh=0.4, size_divisible=64)
    assert model.categories == COCO_CATEGORIES and model.config["p6_from"] == "p5"
    assert model.detections_per_img == 300  # torchvision's default, not ours: not overridden
    assert model.score_thresh == 0.4 and model.transform.size_divisible == 64  # overridden
    assert "weights" not in model.config
    rebuilt = build_retinanet(**model.config)  # the config alone rebuilds the architecture
    rebuilt.load_state_dict(model.state_dict())


def test_torchvision_references_checkpoint_with_another_trunk_and_classes(tmp_path):
    # torchvision's references save {"model": state_dict, ...}; any ResNet trunk and class count converts.
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    tv_model = RetinaNet(backbone, num_classes=3)
    path = tmp_path / "model_25.pth"
    torch.save({"model": tv_model.state_dict(), "optimizer": {}, "epoch": 25,
                "args": argparse.Namespace(model="retinanet_resnet18_fpn", lr=0.01)}, path)
    model, categories = load_detector(str(path))
    assert model.config["backbone"] == "resnet18" and model.num_classes == 3
    assert [c["name"] for c in categories] == ["class_0", "class_1", "class_2"]
    torch.testing.assert_close(model.head.cls_logits.weight, tv_model.head.classification_head.cls_logits.weight)


def test_our_checkpoint_loads_with_overrides(coco_checkpoint):
    path, state = coco_checkpoint
    model, categories = load_detector(path, score_thresh=0.5)
    assert categories == COCO_CATEGORIES and model.score_thresh == 0.5 and model.config["min_size"] == 64
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name,enum_class", [
    ("RetinaNet_ResNet50_FPN_Weights.COCO_V1", "RetinaNet_ResNet50_FPN_Weights"),
    ("RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1", "RetinaNet_ResNet50_FPN_V2_Weights"),
    ("retinanet_resnet50_fpn_v2", "RetinaNet_ResNet50_FPN_V2_Weights"),
])
def test_torchvision_weight_names_resolve_without_downloading(name, enum_class):
    weights = resolve_torchvision_weights(name)
    assert type(weights).__name__ == enum_class and weights.url.startswith("https://")


def test_other_weight_names_are_refused():
    with pytest.raises(CheckpointError, match="for another model"):
        resolve_torchvision_weights("ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(CheckpointError, match="neither a file nor torchvision weights"):
        load_detector("NoSuchModel_Weights.COCO_V1")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_detector("does/not/exist/missing.pth")


def test_download_failure_says_what_to_do(monkeypatch, tmp_path):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError, match=r"\(RetinaNet_ResNet50_FPN_Weights\.COCO_V1\) are not in the "
                                                      r"cache and could not be downloaded from https://") as error:
        load_detector("RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    message = str(error.value)
    assert "copy retinanet_resnet50_fpn_coco-eeacb38b.pth into " + str(tmp_path / "hub" / "checkpoints") in message
    assert "--weights PATH" in message and "\n" not in message


def _write_bad_file(kind: str, directory, coco_checkpoint, torchvision_file) -> tuple:
    """Write one kind of unusable weights file; returns (path, expected reason)."""
    path = directory / f"{kind}.pth"
    if kind == "truncated":
        data = open(coco_checkpoint[0], "rb").read()
        path.write_bytes(data[:len(data) // 2])
        return path, "corrupt or truncated"
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path, "corrupt or truncated"
    if kind == "tensor":
        torch.save(torch.zeros(3), path)
        return path, "holds a Tensor"
    if kind == "resnet18_classifier":
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
        return path, r"image classifier \(fc.weight of shape \(1000, 512\)"
    if kind == "faster_rcnn":
        torch.save(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), path)
        return path, "two-stage detector"
    if kind == "retinanet_missing_a_layer":
        state = dict(torchvision_file[1])
        del state["backbone.body.layer4.2.conv3.weight"]
        torch.save(state, path)
        return path, r"do not fit this model: 1 missing keys \(e.g. backbone.body.layer4.2.conv3.weight\)"
    if kind == "our_checkpoint_wrong_shape":
        checkpoint = torch.load(coco_checkpoint[0], weights_only=True)
        checkpoint["model"]["head.bbox_pred.bias"] = torch.zeros(5)
        torch.save(checkpoint, path)
        return path, r"1 shape mismatches \(e.g. head.bbox_pred.bias: file \(5,\) vs model \(36,\)\)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "tensor", "resnet18_classifier", "faster_rcnn",
                                  "retinanet_missing_a_layer", "our_checkpoint_wrong_shape"])
def test_unusable_files_give_one_line_naming_file_and_problem(kind, tmp_path, coco_checkpoint, torchvision_file):
    path, reason = _write_bad_file(kind, tmp_path, coco_checkpoint, torchvision_file)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + reason) as error:
        load_detector(str(path))
    assert "\n" not in str(error.value)


def _rows(weight: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[A*K, ...]`` -> ``[A, K, ...]``: the classifier rows of every anchor, by class."""
    return weight.reshape(-1, num_classes, *weight.shape[1:])


def test_finetuning_from_our_coco_checkpoint_keeps_matching_classes(coco_checkpoint):
    path, source = coco_checkpoint
    torch.manual_seed(5)
    model = build_retinanet(num_classes=3, **SMALL)
    targets = [{"id": 1, "name": "Person"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "widget"}]
    report = load_pretrained_for_finetuning(model, path, targets)

    state = model.state_dict()
    classifier = {"head.cls_logits.weight", "head.cls_logits.bias"}
    assert sorted(report["loaded"]) == sorted(k for k in source if k not in classifier)
    assert all(torch.equal(state[k], source[k]) for k in report["loaded"])
    assert report["skipped"] == [] and report["unused"] == []
    assert report["copied_classes"] == {"Person": "person", "dog": "dog"} and report["new_classes"] == ["widget"]

    person, dog = COCO_NAMES.index("person"), COCO_NAMES.index("dog")
    weight, bias = _rows(state["head.cls_logits.weight"], 3), _rows(state["head.cls_logits.bias"], 3)
    source_weight = _rows(source["head.cls_logits.weight"], 80)
    source_bias = _rows(source["head.cls_logits.bias"], 80)
    assert weight.shape[0] == 9  # every anchor
    assert torch.equal(weight[:, 0], source_weight[:, person]) and torch.equal(bias[:, 0], source_bias[:, person])
    assert torch.equal(weight[:, 1], source_weight[:, dog]) and torch.equal(bias[:, 1], source_bias[:, dog])
    torch.testing.assert_close(bias[:, 2], torch.full((9,), -math.log(99.0)))  # the prior, pi = 0.01
    assert 0.005 < weight[:, 2].std() < 0.02

    bias_before = model.head.cls_logits.bias.detach().clone()
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    target = {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([0, 2])}
    losses = model([torch.rand(3, 64, 80)], [target])
    sum(losses.values()).backward()
    optimizer.step()
    assert all(torch.isfinite(v) for v in losses.values())
    assert not torch.equal(model.head.cls_logits.bias.detach(), bias_before)


def test_finetuning_from_torchvision_weights_maps_coco_ids(torchvision_file):
    path, tv_state = torchvision_file
    model = build_retinanet(num_classes=2, backbone="resnet50", backbone_norm="frozen_bn", p6_from="p5",
                            min_size=64, max_size=96)
    report = load_pretrained_for_finetuning(model, path, ["widget", "Dog"])
    assert report["copied_classes"] == {"Dog": "dog"} and report["new_classes"] == ["widget"]
    assert len(report["loaded"]) == len(model.state_dict()) - 2 and report["skipped"] == []
    weight = _rows(model.head.cls_logits.weight.detach(), 2)
    tv_weight = _rows(tv_state["head.classification_head.cls_logits.weight"], 91)
    assert torch.equal(weight[:, 1], tv_weight[:, 18])  # COCO category id 18 is "dog"


def test_finetuning_reports_what_does_not_fit(coco_checkpoint):
    path, _ = coco_checkpoint
    model = build_retinanet(num_classes=2, **{**SMALL, "fpn_channels": 64, "head_convs": 2})
    report = load_pretrained_for_finetuning(model, path, ["person", "cat"])
    assert any(line.startswith("fpn.output_convs.0.weight: source (32, 32, 3, 3) vs model (64, 64, 3, 3)")
               for line in report["skipped"])
    assert any(line.startswith("head.cls_logits.weight") for line in report["skipped"])
    assert "head.cls_tower.2.weight" in report["reinitialised"]  # the second tower conv is new
    assert "backbone.body.layer4.1.conv2.weight" in report["loaded"]
    assert report["copied_classes"] == {} and report["new_classes"] == ["person", "cat"]
    with pytest.raises(ValueError, match="2 classes but 3 target categories"):
        load_pretrained_for_finetuning(model, path, ["a", "b", "c"])
