"""Detections from raw head outputs: per-level top-k, decoding, class-aware NMS.

The whole batch goes through each step at once; images are only separated at
the very end to return one dict per image.
"""
import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from utils.boxes.box_coder import BoxCoder
from utils.boxes.box_ops import clip_boxes


def select_candidates(cls_logits, num_anchors_per_level: list, topk_candidates: int):
    """Top-k (anchor, class) pairs per level and image, ranked by logit.

    Args:
        cls_logits: ``[B, N, K]`` for all levels concatenated, or a list of the
            per-level ``[B, N_l, K]`` tensors (no copy when each is contiguous).

    Returns:
        logits ``[B, C]``, anchor indices ``[B, C]`` into N, labels ``[B, C]``,
        with C = sum over levels of min(topk_candidates, N_l * K).
    """
    if isinstance(cls_logits, Tensor):
        cls_logits = cls_logits.split(num_anchors_per_level, dim=1)
    batch, _, num_classes = cls_logits[0].shape
    logits_out, anchors_out, labels_out = [], [], []
    start = 0
    for count, level_logits in zip(num_anchors_per_level, cls_logits):
        level_logits = level_logits.reshape(batch, -1)  # [B, N_l * K]
        k = min(topk_candidates, level_logits.shape[1])
        # Sigmoid is monotone, so ranking logits equals ranking scores and only
        # the k survivors need a sigmoid.
        top_logits, flat_idx = level_logits.topk(k, dim=1)
        logits_out.append(top_logits)
        anchors_out.append(torch.div(flat_idx, num_classes, rounding_mode="floor") + start)
        labels_out.append(flat_idx % num_classes)
        start += count
    return torch.cat(logits_out, 1), torch.cat(anchors_out, 1), torch.cat(labels_out, 1)


def postprocess_detections(cls_logits, box_deltas: Tensor, anchors: Tensor, num_anchors_per_level: list,
                           image_sizes: list, *, score_thresh: float = 0.05, topk_candidates: int = 1000,
                           nms_thresh: float = 0.5, detections_per_img: int = 100,
                           box_coder: BoxCoder = None) -> list:
    """Turn head outputs into detections in the (resized) input frame.

    Args:
        cls_logits: ``[B, N, K]``, or its per-level ``[B, N_l, K]`` parts as a list;
        box_deltas: ``[B, N, 4]``; anchors: ``[N, 4]``.
        num_anchors_per_level: N split by pyramid level (top-k is per level, as in the paper).
        image_sizes: ``[(h, w)]`` of each resized image, for clipping.
        box_coder: how the deltas are decoded (the detector's own; default weights 1, 1, 1, 1).

    Returns:
        one dict per image: "boxes" ``[D, 4]`` xyxy, "scores" ``[D]``, "labels" ``[D]``,
        sorted by score, D <= detections_per_img.
    """
    batch = box_deltas.shape[0]
    if isinstance(cls_logits, Tensor):
        cls_logits = cls_logits.split(num_anchors_per_level, dim=1)
    num_classes = cls_logits[0].shape[-1]
    logits, anchor_idx, labels = select_candidates(cls_logits, num_anchors_per_level, topk_candidates)
    scores = torch.sigmoid(logits.float())
    deltas = box_deltas.gather(1, anchor_idx[..., None].expand(-1, -1, 4))  # [B, C, 4]
    boxes = (box_coder or BoxCoder()).decode(deltas, anchors[anchor_idx])
    heights = torch.tensor([s[0] for s in image_sizes], dtype=boxes.dtype, device=boxes.device)
    widths = torch.tensor([s[1] for s in image_sizes], dtype=boxes.dtype, device=boxes.device)
    boxes = clip_boxes(boxes, heights[:, None], widths[:, None])

    image_idx = torch.arange(batch, device=boxes.device)[:, None].expand_as(labels)
    keep = scores > score_thresh
    boxes, scores, labels, image_idx = boxes[keep], scores[keep], labels[keep], image_idx[keep]
    # One NMS call for the batch: (image, class) pairs form the groups, so boxes
    # of different images or classes never suppress each other.
    kept = batched_nms(boxes, scores, image_idx * num_classes + labels, nms_thresh)
    kept_image = image_idx[kept]
    detections = []
    for i in range(batch):
        sel = kept[kept_image == i][:detections_per_img]
        detections.append({"boxes": boxes[sel], "scores": scores[sel], "labels": labels[sel]})
    return detections


def logit(probability: float) -> float:
    """Inverse sigmoid, for thresholds expressed as probabilities."""
    return math.log(probability / (1 - probability))
