"""Box regression losses on matched (prediction, target) pairs."""
import torch
from torch import Tensor

from utils.boxes.box_ops import elementwise_generalized_iou


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0 / 9) -> Tensor:
    """Element-wise smooth L1 (Huber / beta) on ``[..., 4]`` deltas; ``beta=0`` is plain L1.

    The paper uses beta = 1/9 on (dx, dy, dw, dh): quadratic for small errors so the
    many nearly-right anchors do not dominate, linear for large ones.
    """
    diff = (pred.float() - target.float()).abs()
    if beta < 1e-5:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """``1 - GIoU`` per pair of ``[..., 4]`` xyxy boxes -> ``[...]``."""
    return 1.0 - elementwise_generalized_iou(pred_boxes.float(), target_boxes.float())
