"""How many anchors a dataset gives the classification loss as foreground and as background.

The paper's case for the focal loss (Section 3) is the imbalance of a dense detector's
anchors: on COCO about 1 foreground anchor to 1,000 background ones (100k easy negatives
per image at 800 px). This counts it for a dataset and a model configuration, the way
training assigns them: every image resized as ``model.transform.ImageBatcher`` resizes
it for training (``model.anchor_coverage.training_image_sizes``) and padded on its own to
``size_divisible`` (as at batch 1; a batch of same-sized images pads the same way), the
anchors ``model.anchors.AnchorGenerator`` builds for that input, and the loss's own
matcher (``RetinaNetLoss.match``: IoU >= fg_iou_thresh foreground, < bg_iou_thresh
background, the band between ignored, low-quality matches as the config says). Anchors
over the padding are background, as they are in training. Crowd regions are not in
``box_arrays()``, so anchors they would ignore count as background here (COCO: a few per
mille of its boxes; the demo data has none).

Used by ``tools/ablate.py`` (the ratio of a grid's data, printed and in ``ablation.md``) and
by the tests of the demo-data presets.
"""
import math

import torch

import coco_dataset
from losses.retinanet_loss import RetinaNetLoss
from model.anchor_coverage import BoxSet, feature_grid, training_image_sizes
from model.anchors import AnchorGenerator, default_anchor_sizes
from model.config import ModelConfig
from utils.boxes.matcher import BACKGROUND, IGNORE

_IOU_ELEMENTS = 1 << 22  # images x boxes x anchors per matching call: a few tens of MB


def anchor_balance(arrays: dict, config: ModelConfig, *, max_images: int = None, seed: int = 0) -> dict:
    """Foreground, background and ignored anchors over a dataset's images at ``config``'s training size.

    Args:
        arrays: ``coco_dataset.CocoDetection.box_arrays()`` (boxes xyxy in each image's own pixels).
        config: the model's anchors, training size, padding and matching thresholds.
        max_images: count on that many images drawn at random (``seed``), all when None.

    Returns ``{"images", "foreground", "background", "ignored", "ratio"}``: ``ratio`` is
    background anchors per foreground anchor (inf when there is none).
    """
    box_set = BoxSet.from_arrays(arrays, max_images, seed)
    original = box_set.image_sizes                                              # [I, 2] (h, w)
    resized = training_image_sizes(original, config)                             # [I, 2]
    padded = (torch.ceil(resized / config.size_divisible) * config.size_divisible).long()
    scale = (resized / original).float()                                         # [I, 2] (y, x)
    generator = AnchorGenerator(default_anchor_sizes(config.anchor_base_sizes, config.scales_per_octave),
                                aspect_ratios=config.aspect_ratios)
    matcher = RetinaNetLoss(num_classes=1, fg_iou_thresh=config.fg_iou_thresh, bg_iou_thresh=config.bg_iou_thresh,
                            allow_low_quality_matches=config.allow_low_quality_matches)
    order = torch.argsort(box_set.image_index, stable=True)
    boxes, image_index = box_set.boxes[order], box_set.image_index[order]
    starts = torch.searchsorted(image_index, torch.arange(len(original) + 1))
    counts = {"foreground": 0, "background": 0, "ignored": 0}
    for size in torch.unique(padded, dim=0):
        grid, _ = feature_grid(size[None], len(generator.sizes))
        anchors = generator(tuple(size.tolist()), grid[0].tolist())              # [A, 4]
        images = torch.nonzero((padded == size).all(dim=1)).flatten().tolist()
        most_boxes = max(int(starts[i + 1] - starts[i]) for i in images) or 1
        chunk = max(1, _IOU_ELEMENTS // (most_boxes * len(anchors)))
        for first in range(0, len(images), chunk):
            targets = []
            for i in images[first:first + chunk]:
                image_boxes = boxes[starts[i]:starts[i + 1]] * scale[i].flip(0).repeat(2)  # x by w, y by h
                targets.append({"boxes": image_boxes, "labels": torch.zeros(len(image_boxes), dtype=torch.long)})
            matched, _, _ = matcher.match(anchors, targets)                      # [B, A]
            counts["foreground"] += int((matched >= 0).sum())
            counts["background"] += int((matched == BACKGROUND).sum())
            counts["ignored"] += int((matched == IGNORE).sum())
    ratio = counts["background"] / counts["foreground"] if counts["foreground"] else math.inf
    return {"images": len(original), **counts, "ratio": ratio}


def dataset_anchor_balance(data_path, split: str, config: ModelConfig, max_images: int = None) -> dict:
    """:func:`anchor_balance` of ``data_path``'s ``split`` (annotations only, no image is decoded),
    with ``split`` and the training size added to the result."""
    arrays = coco_dataset.build_dataset(data_path, split).box_arrays()
    balance = anchor_balance(arrays, config, max_images=max_images)
    return {**balance, "split": split, "min_size": config.min_size, "max_size": config.max_size}


def format_balance(balance: dict) -> str:
    """``foreground anchors 1 : 124 (7221 foreground, 897185 background, 13594 ignored; 300 val images at 128 px)``."""
    ratio = "no foreground" if math.isinf(balance["ratio"]) else f"1 : {balance['ratio']:.0f}"
    where = f"{balance['images']} {balance.get('split', '')} images".replace("  ", " ")
    if "min_size" in balance:
        where += f" at {_size(balance['min_size'])} px (longer side <= {balance['max_size']})"
    return (f"foreground anchors {ratio} ({balance['foreground']} foreground, {balance['background']} background, "
            f"{balance['ignored']} ignored; {where})")


def _size(min_size) -> str:
    return "/".join(str(s) for s in min_size) if isinstance(min_size, (list, tuple)) else str(min_size)
