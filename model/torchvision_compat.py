"""Convert torchvision RetinaNet state dicts (``retinanet_resnet50_fpn`` v1 and v2) to this repository's layout.

torchvision                                           here
backbone.body.*                                       backbone.body.*
backbone.fpn.inner_blocks.{i}[.0].*                   fpn.lateral_convs.{i}.*
backbone.fpn.layer_blocks.{i}[.0].*                   fpn.output_convs.{i}.*
backbone.fpn.extra_blocks.p6.* / p7.*                 fpn.extra_convs.0.* / 1.*
head.classification_head.conv.{i}.0.* (conv)          head.cls_tower.{i * step}.*   (step 3 with GN, else 2)
head.classification_head.conv.{i}.1.* (GroupNorm)     head.cls_tower.{i * 3 + 1}.*
head.classification_head.conv.{2i}.* (before 0.13)    head.cls_tower.{2i}.*
head.classification_head.cls_logits.*                 head.cls_logits.*  (91 -> 80 classes, see below)
head.regression_head.{conv,bbox_reg}.*                head.box_tower.*, head.bbox_pred.*

torchvision's COCO models predict 91 classes per anchor: label = COCO category id,
with slots for background (0) and the ids COCO never used ("N/A"). Here label k
is the k-th of the 80 real categories, ``COCO_CATEGORIES[k]``.
"""
import re

import torch
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

from utils.runtime.checkpoint import CheckpointError

# torchvision's list is indexed by category id; the placeholders are not categories.
_TORCHVISION_COCO_NAMES = RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
COCO_CATEGORIES = [{"id": cat_id, "name": name} for cat_id, name in enumerate(_TORCHVISION_COCO_NAMES)
                   if name not in ("__background__", "N/A")]
COCO_CATEGORY_IDS = [category["id"] for category in COCO_CATEGORIES]
NUM_TORCHVISION_COCO_CLASSES = len(_TORCHVISION_COCO_NAMES)  # 91
assert len(COCO_CATEGORIES) == 80

# FrozenBatchNorm2d's eps in this repository (torchvision's default since 0.8).
BACKBONE_BN_EPS = 1e-5

# (blocks per stage, bottleneck blocks, conv groups) -> name in model.backbone.BACKBONES
_RESNET_LAYOUTS = {
    ((2, 2, 2, 2), False, 1): "resnet18",
    ((3, 4, 6, 3), False, 1): "resnet34",
    ((3, 4, 6, 3), True, 1): "resnet50",
    ((3, 4, 23, 3), True, 1): "resnet101",
    ((3, 8, 36, 3), True, 1): "resnet152",
    ((3, 4, 6, 3), True, 32): "resnext50_32x4d",
    ((3, 4, 23, 3), True, 32): "resnext101_32x8d",
}

_RENAMES = [
    (re.compile(r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$"), "fpn.lateral_convs.{0}.{1}"),
    (re.compile(r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$"), "fpn.output_convs.{0}.{1}"),
    (re.compile(r"backbone\.fpn\.extra_blocks\.p6\.(weight|bias)$"), "fpn.extra_convs.0.{0}"),
    (re.compile(r"backbone\.fpn\.extra_blocks\.p7\.(weight|bias)$"), "fpn.extra_convs.1.{0}"),
    (re.compile(r"head\.classification_head\.cls_logits\.(weight|bias)$"), "head.cls_logits.{0}"),
    (re.compile(r"head\.regression_head\.bbox_reg\.(weight|bias)$"), "head.bbox_pred.{0}"),
]
# conv.{i}.{0 conv | 1 norm}.param since torchvision 0.13 (Conv2dNormActivation); conv.{2i}.param before.
_TOWER = re.compile(r"head\.(classification|regression)_head\.conv\.(\d+)\.(?:(\d)\.)?(weight|bias)$")
_TOWER_NAMES = {"classification": "cls_tower", "regression": "box_tower"}


def is_torchvision_retinanet_state_dict(state: dict) -> bool:
    """True if ``state`` has the keys of a torchvision RetinaNet (possibly saved from DDP, ``module.``)."""
    return any(_strip_module(key).startswith("head.classification_head.") for key in state)


def convert_torchvision_state_dict(tv_state: dict, coco_contiguous: bool = True, *,
                                   backbone_bn_eps: float = BACKBONE_BN_EPS, source: str = "state dict"):
    """torchvision RetinaNet ``state_dict`` -> ``(state_dict, model_config)`` for :class:`model.config.ModelConfig`.

    Args:
        tv_state: from ``retinanet_resnet50_fpn`` (v1: P6 from P5, no head norm, L1 box
            loss) or ``retinanet_resnet50_fpn_v2`` (P6 from C5, GroupNorm heads, GIoU),
            in the current or the pre-0.13 key layout; other ResNet trunks work too.
        coco_contiguous: reduce torchvision's 91 COCO outputs per anchor to the 80 real
            categories, so label k means ``COCO_CATEGORIES[k]``. Needs a 91-class model;
            False keeps the classifier as it is (label = torchvision's label).
        backbone_bn_eps: the eps the weights are meant to run with. torchvision runs its
            v1 COCO weights with eps 0 (trained before pytorch/vision#2933); anything
            other than ``BACKBONE_BN_EPS`` is folded into the frozen statistics.
        source: how to name the weights in error messages (a file name).

    Returns:
        our state dict, and a dict of ``ModelConfig`` fields reproducing torchvision's
        model: frozen BN, its anchors, 32-pixel padding (so level strides, hence anchor
        positions, are computed from the same padded size), 800/1333 resizing and its
        post-processing defaults.

    Raises:
        CheckpointError: keys or shapes that are not a torchvision RetinaNet.
    """
    tv_state = {_strip_module(k): v for k, v in tv_state.items() if not k.endswith("num_batches_tracked")}
    if not is_torchvision_retinanet_state_dict(tv_state):
        raise CheckpointError(f"{source} is not a torchvision RetinaNet state dict (no head.classification_head.*)")
    # Only GroupNorm heads (v2) have a second module, conv.{i}.1, in a tower layer.
    head_norm = "gn" if any(m and m.group(3) == "1" for m in map(_TOWER.match, tv_state)) else None
    state, unknown = {}, []
    for key, value in tv_state.items():
        new_key = _rename(key, head_norm)
        if new_key is None:
            unknown.append(key)
        else:
            state[new_key] = value
    if unknown:
        raise CheckpointError(f"{source} has {len(unknown)} keys that are not part of a torchvision RetinaNet "
                              f"(e.g. {unknown[0]})")
    config = _infer_config(state, head_norm, source)
    num_anchors = config.pop("num_anchors")
    if coco_contiguous:
        if config["num_classes"] != NUM_TORCHVISION_COCO_CLASSES:
            raise CheckpointError(f"{source} predicts {config['num_classes']} classes per anchor, not the "
                                  f"{NUM_TORCHVISION_COCO_CLASSES} of torchvision's COCO models; "
                                  f"convert it with coco_contiguous=False")
        for name in ("head.cls_logits.weight", "head.cls_logits.bias"):
            per_anchor = state[name].reshape(num_anchors, NUM_TORCHVISION_COCO_CLASSES, *state[name].shape[1:])
            state[name] = per_anchor[:, COCO_CATEGORY_IDS].reshape(-1, *state[name].shape[1:]).clone()
        config["num_classes"] = len(COCO_CATEGORY_IDS)
    if backbone_bn_eps != BACKBONE_BN_EPS:
        _fold_bn_eps(state, backbone_bn_eps)
    return state, config


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _rename(key: str, head_norm) -> str:
    if key.startswith("backbone.body."):
        return key
    for pattern, template in _RENAMES:
        match = pattern.match(key)
        if match:
            return template.format(*match.groups())
    match = _TOWER.match(key)
    if match:
        head, layer, sublayer, param = match.groups()
        if sublayer is None:  # pre-0.13 layout: Sequential(conv, ReLU, conv, ReLU, ...)
            index = int(layer)
        else:
            index = int(layer) * (3 if head_norm == "gn" else 2) + int(sublayer)
        return f"head.{_TOWER_NAMES[head]}.{index}.{param}"
    return None


def _infer_config(state: dict, head_norm, source: str) -> dict:
    """``ModelConfig`` fields from tensor shapes; every required key is checked here."""
    required = ["backbone.body.conv1.weight", "backbone.body.layer1.0.conv2.weight", "fpn.lateral_convs.0.weight",
                "fpn.extra_convs.0.weight", "head.cls_logits.weight", "head.bbox_pred.weight"]
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{source} is an incomplete torchvision RetinaNet state dict (no {missing[0]})")
    backbone = _infer_backbone(state, source)
    fpn_channels = state["fpn.lateral_convs.0.weight"].shape[0]
    c5_channels = state[f"fpn.lateral_convs.{_count(state, 'fpn.lateral_convs.') - 1}.weight"].shape[1]
    # torchvision's LastLevelP6P7 takes P5 exactly when its input width equals the output width.
    p6_in_channels = state["fpn.extra_convs.0.weight"].shape[1]
    p6_from = "p5" if p6_in_channels == fpn_channels else "c5"
    if p6_from == "c5" and p6_in_channels != c5_channels:
        raise CheckpointError(f"{source}: P6 conv takes {p6_in_channels} channels, neither P5 ({fpn_channels}) "
                              f"nor C5 ({c5_channels})")
    num_anchors, remainder = divmod(state["head.bbox_pred.weight"].shape[0], 4)
    if remainder or num_anchors != 9:
        raise CheckpointError(f"{source}: {state['head.bbox_pred.weight'].shape[0]} box outputs per location; "
                              f"only torchvision's default 9 anchors (3 scales x 3 ratios) are supported")
    num_classes, remainder = divmod(state["head.cls_logits.weight"].shape[0], num_anchors)
    if remainder:
        raise CheckpointError(f"{source}: {state['head.cls_logits.weight'].shape[0]} classification outputs "
                              f"are not a multiple of {num_anchors} anchors")
    towers = {int(k.split(".")[2]) for k in state if k.startswith("head.cls_tower.") and k.endswith(".weight")}
    head_convs = len(towers) // (2 if head_norm == "gn" else 1)
    return {
        "num_anchors": num_anchors,
        "num_classes": num_classes, "backbone": backbone, "backbone_norm": "frozen_bn",
        "trainable_backbone_layers": 3, "fpn_channels": fpn_channels,
        "num_extra_levels": _count(state, "fpn.extra_convs."), "p6_from": p6_from,
        "head_convs": head_convs, "head_norm": head_norm,
        "anchor_base_sizes": [32, 64, 128, 256, 512], "scales_per_octave": 3, "aspect_ratios": [0.5, 1.0, 2.0],
        "min_size": 800, "max_size": 1333, "size_divisible": 32,
        "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 300, "topk_candidates": 1000,
        "fg_iou_thresh": 0.5, "bg_iou_thresh": 0.4, "allow_low_quality_matches": True,
        "focal_alpha": 0.25, "focal_gamma": 2.0,
        # v2 (the GroupNorm head) was trained with GIoU, v1 with L1 on the encoded deltas.
        "box_loss": "giou" if head_norm == "gn" else "l1", "bbox_reg_weights": [1.0, 1.0, 1.0, 1.0],
    }


def _count(state: dict, prefix: str) -> int:
    """Number of modules ``prefix{i}.`` in ``state``."""
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def _infer_backbone(state: dict, source: str) -> str:
    blocks = tuple(_count(state, f"backbone.body.layer{stage}.") for stage in range(1, 5))
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    conv2 = state["backbone.body.layer1.0.conv2.weight"]
    groups = conv2.shape[0] // conv2.shape[1]
    name = _RESNET_LAYOUTS.get((blocks, bottleneck, groups))
    if name is None:
        raise CheckpointError(f"{source}: unsupported backbone ({blocks} blocks per stage, "
                              f"{'bottleneck' if bottleneck else 'basic'} blocks, {groups} groups)")
    return name


def _fold_bn_eps(state: dict, eps: float) -> None:
    """Rewrite frozen BN statistics so that ``BACKBONE_BN_EPS`` gives what ``eps`` gave.

    FrozenBN computes ``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``.
    Folding ``1 / sqrt(var + eps)`` into ``w`` and setting ``var = 1 - BACKBONE_BN_EPS``
    keeps both terms, without a negative variance when ``var`` is tiny.
    """
    for key in [k for k in state if k.startswith("backbone.body.") and k.endswith(".running_var")]:
        prefix = key[:-len("running_var")]
        var = state[key].double()
        state[prefix + "weight"] = (state[prefix + "weight"].double() / torch.sqrt(var + eps)).to(state[key].dtype)
        state[key] = torch.full_like(state[key], 1.0 - BACKBONE_BN_EPS)
