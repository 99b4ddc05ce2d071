"""Anchor-to-ground-truth assignment by IoU, for a whole padded batch at once."""
import torch
from torch import Tensor

BACKGROUND = -1
IGNORE = -2


def match_anchors(iou: Tensor, gt_valid: Tensor, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                  allow_low_quality_matches: bool = True) -> Tensor:
    """Assign every anchor a ground-truth index, ``BACKGROUND`` or ``IGNORE``.

    Args:
        iou: ``[B, G, A]`` IoU of each (padded) ground-truth box with each anchor.
        gt_valid: ``BoolTensor[B, G]``, False for padding rows.
        fg_iou_thresh: IoU >= this is foreground (0.5 in the paper).
        bg_iou_thresh: IoU < this is background (0.4); the band in between is ignored.
        allow_low_quality_matches: every ground-truth box also keeps the anchors
            with which it has its highest IoU, even below ``fg_iou_thresh``, so
            small or oddly shaped objects are never left without a positive.

    Returns:
        ``Int64Tensor[B, A]``: index into G for foreground anchors, else ``BACKGROUND`` / ``IGNORE``.
        An image without boxes is all background.
    """
    batch, num_gt, num_anchors = iou.shape
    if num_gt == 0:
        return torch.full((batch, num_anchors), BACKGROUND, dtype=torch.long, device=iou.device)
    # Padding rows must never win the max over G.
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    best_iou, matched_idx = iou.max(dim=1)  # [B, A]
    foreground = best_iou >= fg_iou_thresh
    if allow_low_quality_matches:
        best_iou_per_gt = iou.max(dim=2, keepdim=True).values  # [B, G, 1]
        # Ties count: every anchor sharing a box's best IoU is kept. A box that
        # overlaps no anchor at all (best IoU 0) must not claim every anchor.
        is_best_for_some_gt = ((iou == best_iou_per_gt) & (best_iou_per_gt > 0)).any(dim=1)
        # Like Detectron, such an anchor is assigned to its own best box, which
        # is that box unless another overlaps the anchor more.
        foreground |= is_best_for_some_gt
    result = torch.where(best_iou < bg_iou_thresh, BACKGROUND, IGNORE)
    return torch.where(foreground, matched_idx, result)
