"""Online hard example mining (OHEM) for RetinaNet's classification loss: the paper's baseline.

Section 5.1 ("Online Hard Example Mining") and Table 1d: every non-ignored anchor of an image
is scored by its cross-entropy loss, non-maximum suppression at IoU ``nms_thresh`` runs over
the anchors' predicted boxes with that loss as the score, and the ``batch_size`` highest-loss
survivors form the image's minibatch; optionally at most ``fg_ratio`` of it may be foreground
(the paper's "OHEM 1:3" is 0.25). The loss is cross-entropy over the chosen anchors only.
Unlike the focal loss, which down-weights easy examples, OHEM discards them outright.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from ops.fused_focal_loss import focal_loss_from_labels


def anchor_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid cross-entropy of each anchor, summed over its K classes, against one-hot labels.

    Args:
        logits: ``[..., K]`` class logits; labels: ``Int64Tensor[...]``, the class in ``[0, K)`` of a
            foreground anchor, negative for background.

    Returns ``FloatTensor[...]`` (fp32). Equal to ``sigmoid_focal_loss(logits, one_hot, alpha=-1,
    gamma=0).sum(-1)``, computed without the one-hot targets: BCE(x, t) = softplus(x) - t x, so a
    row costs sum_k softplus(x_k), minus x_label when it is foreground.
    """
    logits = logits.float()
    label_logit = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return F.softplus(logits).sum(-1) - torch.where(labels >= 0, label_logit, 0.0)


@torch.no_grad()
def select_hard_examples(losses: Tensor, boxes: Tensor, foreground: Tensor, valid: Tensor, *, batch_size: int = 256,
                         nms_thresh: float = 0.7, fg_ratio: float = None) -> Tensor:
    """Choose each image's OHEM minibatch.

    Args:
        losses: ``[B, A]`` the score of each anchor (its loss; higher = harder).
        boxes: ``[B, A, 4]`` xyxy boxes NMS compares (the anchors' predicted boxes).
        foreground: ``BoolTensor[B, A]``; valid: ``BoolTensor[B, A]``, False for ignored anchors,
            which are never chosen and suppress nothing.
        batch_size: anchors chosen per image (fewer if fewer survive).
        nms_thresh: a survivor suppresses every lower-loss anchor whose box overlaps its own with
            IoU > nms_thresh; 1 = no suppression.
        fg_ratio: None, or at most ``round(fg_ratio * batch_size)`` foreground anchors per image
            (the highest-loss foreground survivors); the other places go to background survivors.

    Returns ``BoolTensor[B, A]``: the chosen anchors.

    Greedy NMS decides each anchor from the higher-loss anchors alone, so running it on the
    top-M anchors by loss gives the exact decisions for those M. M starts at 2 x batch_size and
    doubles only while some image has too few survivors of a kind in its top M: the NMS (whose
    cost grows with M^2) never sees the ~10^5 easy anchors unless an image needs them. With
    ``fg_ratio``, an image with fewer foreground survivors than its quota needs all of its
    foreground anchors in the top M, however easy the last of them is. All images share one
    padded top-M; only the NMS itself runs per image.
    """
    num_images, num_anchors = losses.shape
    scores = losses.float().masked_fill(~valid, -math.inf)
    fg_quota = batch_size if fg_ratio is None else int(round(fg_ratio * batch_size))
    valid_fg, valid_bg = (valid & foreground).sum(1), (valid & ~foreground).sum(1)  # [B]
    num_candidates = min(num_anchors, 2 * batch_size)
    while True:
        top_scores, top_index = scores.topk(num_candidates, dim=1)  # [B, M], highest loss first
        keep = top_scores > -math.inf  # the valid anchors among the top M
        if nms_thresh < 1:
            keep = _nms_survivors(boxes.gather(1, top_index[..., None].expand(-1, -1, 4)), top_scores, keep,
                                  nms_thresh)
        top_fg = foreground.gather(1, top_index)
        fg_kept, bg_kept = keep & top_fg, keep & ~top_fg
        # Survivors in the top M are final; ``seen_all_*``: every valid anchor of that kind is in the top M.
        in_top = top_scores > -math.inf
        seen_all_fg = (in_top & top_fg).sum(1) >= valid_fg
        seen_all_bg = (in_top & ~top_fg).sum(1) >= valid_bg
        if fg_ratio is None:
            rank = keep.cumsum(1)  # 1-based rank among the survivors
            chosen = keep & (rank <= batch_size)
            done = (keep.sum(1) >= batch_size) | (seen_all_fg & seen_all_bg)
        else:
            num_fg = fg_kept.sum(1).clamp(max=fg_quota)  # [B]; exact once done
            chosen = (fg_kept & (fg_kept.cumsum(1) <= fg_quota)) | \
                     (bg_kept & (bg_kept.cumsum(1) <= (batch_size - num_fg)[:, None]))
            fg_known = (fg_kept.sum(1) >= fg_quota) | seen_all_fg
            bg_known = (bg_kept.sum(1) >= batch_size - num_fg) | seen_all_bg
            done = fg_known & bg_known
        if bool(done.all()) or num_candidates == num_anchors:
            break
        num_candidates = min(num_anchors, 2 * num_candidates)
    selected = torch.zeros_like(valid)
    return selected.scatter_(1, top_index, chosen)


def _nms_survivors(boxes: Tensor, scores: Tensor, candidate: Tensor, nms_thresh: float) -> Tensor:
    """``[B, M, 4]`` boxes, ``[B, M]`` scores and candidate mask -> ``[B, M]`` mask of NMS survivors.

    One NMS per image: a single call on offset boxes would compare every pair across images
    on CPU, and torchvision's offset trick assumes non-negative coordinates, which anchors at
    the image border do not have.
    """
    keep = torch.zeros_like(candidate)
    for image, (image_boxes, image_scores, image_candidate) in enumerate(zip(boxes, scores, candidate)):
        index = image_candidate.nonzero().squeeze(1)
        survivors = nms(image_boxes[index].float(), image_scores[index], nms_thresh)
        keep[image, index[survivors]] = True
    return keep


def ohem_cross_entropy(cls_logits: Tensor, labels: Tensor, valid: Tensor, pred_boxes: Tensor, *,
                       batch_size: int = 256, nms_thresh: float = 0.7, fg_ratio: float = None) -> tuple:
    """Summed cross-entropy over each image's OHEM minibatch and its size.

    Args:
        cls_logits: ``[B, A, K]``; labels: ``[B, A]`` (class, or negative for background);
        valid: ``[B, A]`` non-ignored anchors; pred_boxes: ``[B, A, 4]`` xyxy predicted boxes (no gradient).

    Returns ``(loss_sum, num_selected)``, both scalar tensors: divide the first by the second
    (summed over the batch) for the paper's normalisation.
    """
    with torch.no_grad():
        scores = anchor_cross_entropy(cls_logits.detach(), labels)
    selected = select_hard_examples(scores, pred_boxes, labels >= 0, valid, batch_size=batch_size,
                                    nms_thresh=nms_thresh, fg_ratio=fg_ratio)
    # Only the chosen rows enter the loss (and its backward): B x batch_size rows, not B x A.
    rows, chosen_labels = cls_logits[selected], labels[selected]
    loss = focal_loss_from_labels(rows, chosen_labels, torch.ones_like(chosen_labels, dtype=torch.bool),
                                  alpha=-1.0, gamma=0.0)
    return loss, selected.sum()
