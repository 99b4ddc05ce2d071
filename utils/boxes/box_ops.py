"""Pure box maths. No state, no device assumptions.

Boxes are absolute ``x1, y1, x2, y2`` unless a name says otherwise. Every
function works on any number of leading dimensions (``unbind(-1)`` /
``stack(-1)``), so the same code serves one image or a padded batch.
"""
import math

import torch
from torch import Tensor

# Decoded log-size deltas are clamped here so exp() cannot overflow: a box may
# grow at most 1000/16 times its anchor (the Detectron / torchvision convention).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``[..., 4]`` (x, y, w, h) -> ``[..., 4]`` (x1, y1, x2, y2)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> COCO ``[..., 4]`` (x, y, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4]`` -> ``[...]``. Degenerate boxes have area <= 0."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``[..., N, 4]`` x ``[..., M, 4]`` -> intersection areas ``[..., N, M]``."""
    top_left = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU, batched: ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``.

    Equals ``torchvision.ops.box_iou`` for 2-D inputs; leading dims broadcast.
    """
    inter = _pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    # A zero union only happens for two zero-area boxes; their IoU is 0, not NaN.
    return inter / union.clamp(min=torch.finfo(inter.dtype).tiny)


def box_ioa(boxes: Tensor, regions: Tensor) -> Tensor:
    """Intersection over the area of ``boxes``: ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``.

    Used for crowd regions: an anchor lying mostly inside a crowd box is neither
    a clean positive nor a clean negative.
    """
    inter = _pairwise_intersection(boxes, regions)
    return inter / box_area(boxes)[..., :, None].clamp(min=torch.finfo(inter.dtype).tiny)


def elementwise_generalized_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of matching pairs (Rezatofighi et al. 2019): ``[..., 4]`` x ``[..., 4]`` -> ``[...]``."""
    x1, y1, x2, y2 = boxes1.unbind(-1)
    gx1, gy1, gx2, gy2 = boxes2.unbind(-1)
    inter_w = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp(min=0)
    inter_h = (torch.minimum(y2, gy2) - torch.maximum(y1, gy1)).clamp(min=0)
    inter = inter_w * inter_h
    union = (x2 - x1) * (y2 - y1) + (gx2 - gx1) * (gy2 - gy1) - inter
    iou = inter / (union + eps)
    hull = (torch.maximum(x2, gx2) - torch.minimum(x1, gx1)) * (torch.maximum(y2, gy2) - torch.minimum(y1, gy1))
    return iou - (hull - union) / (hull + eps)


def encode_boxes(gt_boxes: Tensor, anchors: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets of ``gt_boxes`` relative to ``anchors`` (both ``[..., 4]``).

    Returns ``[..., 4]`` deltas ``(dx, dy, dw, dh)``: centre offsets in anchor
    widths/heights and log size ratios, each multiplied by its weight.
    """
    wx, wy, ww, wh = weights
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)
    gx1, gy1, gx2, gy2 = gt_boxes.unbind(-1)
    anchor_w, anchor_h = ax2 - ax1, ay2 - ay1
    gt_w, gt_h = gx2 - gx1, gy2 - gy1
    dx = wx * ((gx1 + 0.5 * gt_w) - (ax1 + 0.5 * anchor_w)) / anchor_w
    dy = wy * ((gy1 + 0.5 * gt_h) - (ay1 + 0.5 * anchor_h)) / anchor_h
    dw = ww * torch.log(gt_w / anchor_w)
    dh = wh * torch.log(gt_h / anchor_h)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode_boxes(deltas: Tensor, anchors: Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                 clip: float = BBOX_XFORM_CLIP) -> Tensor:
    """Inverse of :func:`encode_boxes`: ``[..., 4]`` deltas + ``[..., 4]`` anchors -> boxes.

    Computed in the anchors' dtype (fp32) even when the deltas come from an
    fp16/bf16 head, because box corners of large images lose pixels in half precision.
    """
    deltas = deltas.to(anchors.dtype)
    wx, wy, ww, wh = weights
    ax1, ay1, ax2, ay2 = anchors.unbind(-1)
    anchor_w, anchor_h = ax2 - ax1, ay2 - ay1
    ctr_x, ctr_y = ax1 + 0.5 * anchor_w, ay1 + 0.5 * anchor_h
    dx, dy, dw, dh = deltas.unbind(-1)
    dx, dy = dx / wx, dy / wy
    dw, dh = (dw / ww).clamp(max=clip), (dh / wh).clamp(max=clip)
    pred_ctr_x, pred_ctr_y = dx * anchor_w + ctr_x, dy * anchor_h + ctr_y
    half_w, half_h = 0.5 * torch.exp(dw) * anchor_w, 0.5 * torch.exp(dh) * anchor_h
    return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h,
                        pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1)


def clip_boxes(boxes: Tensor, height, width) -> Tensor:
    """Clamp ``[..., 4]`` boxes into ``[0, width] x [0, height]``.

    ``height`` / ``width`` may be numbers or tensors broadcastable to ``boxes[..., 0]``
    (one size per image of a batch).
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    width = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    height = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(torch.maximum(x1, zero), width)
    x2 = torch.minimum(torch.maximum(x2, zero), width)
    y1 = torch.minimum(torch.maximum(y1, zero), height)
    y2 = torch.minimum(torch.maximum(y2, zero), height)
    return torch.stack((x1, y1, x2, y2), dim=-1)
