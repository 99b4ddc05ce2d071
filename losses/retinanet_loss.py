"""RetinaNet training loss for a padded batch: matching, targets, focal (or CE / OHEM) + box losses."""
import torch
from torch import Tensor

from losses.box_losses import giou_loss, smooth_l1_loss
from losses.ohem import ohem_cross_entropy
from ops.fused_focal_loss import focal_loss_from_labels
from utils.boxes.box_coder import BoxCoder
from utils.boxes.box_ops import box_ioa, box_iou
from utils.boxes.matcher import BACKGROUND, IGNORE, match_anchors
from utils.runtime.distributed import all_reduce_mean
from utils.runtime.errors import ConfigError

# The loss names, defined here only: model/config.py validates a ModelConfig with check_loss_names.
BOX_LOSSES = ("smooth_l1", "l1", "giou")
# The paper's classification losses (Section 5.1, Table 1).
CLS_LOSSES = ("focal", "ce", "balanced-ce", "ohem")


def check_loss_names(box_loss: str, cls_loss: str) -> None:
    """Raise :class:`utils.runtime.errors.ConfigError` (a ValueError) naming a box or classification
    loss that is not one of ``BOX_LOSSES`` / ``CLS_LOSSES``."""
    if box_loss not in BOX_LOSSES:
        raise ConfigError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    if cls_loss not in CLS_LOSSES:
        raise ConfigError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")


def pad_targets(targets: list, key: str, device) -> tuple:
    """Stack per-image ``[N_i, 4]`` boxes into ``[B, G, 4]`` plus a ``[B, G]`` validity mask."""
    counts = [t[key].shape[0] if key in t else 0 for t in targets]
    # At least one (invalid) row, so a batch without any box still gathers cleanly.
    max_count = max(max(counts, default=0), 1)
    padded = torch.zeros((len(targets), max_count, 4), device=device)
    valid = torch.zeros((len(targets), max_count), dtype=torch.bool, device=device)
    for i, (target, count) in enumerate(zip(targets, counts)):
        if count:
            padded[i, :count] = target[key]
            valid[i, :count] = True
    return padded, valid


class RetinaNetLoss(torch.nn.Module):
    """Focal loss on every non-ignored anchor + box loss on foreground anchors.

    Both sums are divided by the number of foreground anchors in the batch
    (averaged over DDP ranks, so every rank's gradient has the same scale), at
    least 1 -- the paper's normalisation.

    Args:
        box_coder: the detector's :class:`utils.boxes.box_coder.BoxCoder` (targets are encoded,
            and GIoU predictions decoded, exactly as the detector decodes).
        cls_loss: the classification loss, the paper's Table 1 baselines:
            "focal" (``focal_alpha``, ``focal_gamma``; eq. 5);
            "ce": sigmoid cross-entropy over every non-ignored anchor and class (gamma 0, no alpha);
            "balanced-ce": alpha-balanced CE (eq. 3: ``focal_alpha``, gamma 0);
            "ohem": CE over each image's ``ohem_batch`` highest-loss anchors that survive NMS at
            ``ohem_nms_thresh`` (at most ``ohem_fg_ratio`` of them foreground, if set), divided by
            the number chosen instead (``losses/ohem.py``). The box loss is the same for all four.
            focal, ce and balanced-ce run the same fused kernel (ce and balanced-ce are its gamma = 0
            cases), so each costs what the focal loss costs.
        box_loss: "smooth_l1" (beta ``smooth_l1_beta``, 1/9 in the paper), "l1" or "giou".
        crowd_ioa_thresh: anchors covered more than this by a crowd region are
            ignored instead of being trained as background.

    ``compile_dense()`` runs the dense part (focal + box losses over all anchors) through
    ``torch.compile``, which fuses it into a few kernels (useful on GPU; on CPU the eager
    chunked focal loss is already about as fast).
    """

    def __init__(self, num_classes: int, box_coder: BoxCoder = None, *, fg_iou_thresh: float = 0.5,
                 bg_iou_thresh: float = 0.4, allow_low_quality_matches: bool = True, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, box_loss: str = "smooth_l1", smooth_l1_beta: float = 1.0 / 9,
                 crowd_ioa_thresh: float = 0.5, cls_loss: str = "focal", ohem_batch: int = 256,
                 ohem_nms_thresh: float = 0.7, ohem_fg_ratio: float = None):
        super().__init__()
        check_loss_names(box_loss, cls_loss)
        self.num_classes = num_classes
        self.box_coder = box_coder or BoxCoder()
        self.fg_iou_thresh, self.bg_iou_thresh = fg_iou_thresh, bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_loss = cls_loss
        # (alpha, gamma) the fused kernel runs with: CE is the focal loss at gamma 0, without alpha.
        self.cls_alpha, self.cls_gamma = {"focal": (focal_alpha, focal_gamma), "ce": (-1.0, 0.0),
                                          "balanced-ce": (focal_alpha, 0.0), "ohem": (-1.0, 0.0)}[cls_loss]
        self.ohem_batch, self.ohem_nms_thresh, self.ohem_fg_ratio = ohem_batch, ohem_nms_thresh, ohem_fg_ratio
        self.box_loss = box_loss
        self.smooth_l1_beta = 0.0 if box_loss == "l1" else smooth_l1_beta
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self._dense_losses = _dense_losses

    def compile_dense(self, **compile_kwargs) -> "RetinaNetLoss":
        """``torch.compile`` the dense part (focal + box losses over all anchors) with these options."""
        self._dense_losses = torch.compile(_dense_losses, **compile_kwargs)
        return self

    def match(self, anchors: Tensor, targets: list):
        """Returns matched index ``[B, A]`` (>= 0 foreground, BACKGROUND, IGNORE),
        padded gt boxes ``[B, G, 4]`` and gt labels ``[B, G]``."""
        device = anchors.device
        gt_boxes, gt_valid = pad_targets(targets, "boxes", device)
        gt_labels = torch.zeros(gt_valid.shape, dtype=torch.long, device=device)
        for i, target in enumerate(targets):
            gt_labels[i, :target["labels"].shape[0]] = target["labels"]
        iou = box_iou(gt_boxes, anchors[None])  # [B, G, A]
        matched = match_anchors(iou, gt_valid, fg_iou_thresh=self.fg_iou_thresh, bg_iou_thresh=self.bg_iou_thresh,
                                allow_low_quality_matches=self.allow_low_quality_matches)
        if any("crowd_boxes" in t and t["crowd_boxes"].shape[0] for t in targets):
            crowd_boxes, crowd_valid = pad_targets(targets, "crowd_boxes", device)
            in_crowd = ((box_ioa(anchors[None], crowd_boxes) > self.crowd_ioa_thresh)
                        & crowd_valid[:, None, :]).any(dim=2)  # [B, A]
            matched = torch.where((matched == BACKGROUND) & in_crowd, IGNORE, matched)
        return matched, gt_boxes, gt_labels

    def forward(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, targets: list) -> dict:
        """Args:
            cls_logits: ``[B, A, K]``; box_deltas: ``[B, A, 4]``; anchors: ``[A, 4]``;
            targets: per image "boxes" ``[N_i, 4]`` xyxy in the resized frame, "labels" ``[N_i]``,
            optional "crowd_boxes" ``[M_i, 4]``.
        """
        matched, gt_boxes, gt_labels = self.match(anchors, targets)
        # Kept as a tensor (no .item()): the normaliser never forces a host sync.
        num_foreground = all_reduce_mean((matched >= 0).sum().float()).clamp(min=1.0)
        if self.cls_loss == "ohem":
            return self._ohem_losses(cls_logits, box_deltas, anchors, matched, gt_boxes, gt_labels, num_foreground)
        cls_loss, box_loss = self._dense_losses(cls_logits, box_deltas, anchors, matched, gt_boxes, gt_labels,
                                                focal_alpha=self.cls_alpha, focal_gamma=self.cls_gamma,
                                                box_loss=self.box_loss, smooth_l1_beta=self.smooth_l1_beta,
                                                box_coder=self.box_coder)
        return {"classification": cls_loss / num_foreground, "bbox_regression": box_loss / num_foreground}

    def _ohem_losses(self, cls_logits, box_deltas, anchors, matched, gt_boxes, gt_labels, num_foreground) -> dict:
        """OHEM classification loss (normalised by the anchors chosen) + the usual box loss."""
        foreground, gt_index = matched >= 0, matched.clamp(min=0)
        labels = torch.where(foreground, gt_labels.gather(1, gt_index), -1)  # [B, A]
        pred_boxes = self.box_coder.decode(box_deltas.detach(), anchors[None].expand(box_deltas.shape[0], -1, -1))
        cls_loss, num_selected = ohem_cross_entropy(cls_logits, labels, matched != IGNORE, pred_boxes,
                                                    batch_size=self.ohem_batch, nms_thresh=self.ohem_nms_thresh,
                                                    fg_ratio=self.ohem_fg_ratio)
        box_loss = _box_loss_sum(box_deltas, anchors, foreground, gt_index, gt_boxes, box_loss=self.box_loss,
                                 smooth_l1_beta=self.smooth_l1_beta, box_coder=self.box_coder)
        num_selected = all_reduce_mean(num_selected.float()).clamp(min=1.0)
        return {"classification": cls_loss / num_selected, "bbox_regression": box_loss / num_foreground}


def _dense_losses(cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, matched: Tensor, gt_boxes: Tensor,
                  gt_labels: Tensor, *, focal_alpha: float, focal_gamma: float, box_loss: str, smooth_l1_beta: float,
                  box_coder: BoxCoder) -> tuple:
    """Summed (classification, box) losses of a matched batch; ``matched`` is ``[B, A]``."""
    foreground = matched >= 0  # [B, A]
    valid = matched != IGNORE
    gt_index = matched.clamp(min=0)
    # Class of each foreground anchor, -1 for background: the one-hot [B, A, K]
    # targets are never materialised (see focal_loss_from_labels).
    labels = torch.where(foreground, gt_labels.gather(1, gt_index), -1)  # [B, A]
    cls_loss = focal_loss_from_labels(cls_logits, labels, valid, alpha=focal_alpha, gamma=focal_gamma)
    return cls_loss, _box_loss_sum(box_deltas, anchors, foreground, gt_index, gt_boxes, box_loss=box_loss,
                                   smooth_l1_beta=smooth_l1_beta, box_coder=box_coder)


def _box_loss_sum(box_deltas: Tensor, anchors: Tensor, foreground: Tensor, gt_index: Tensor, gt_boxes: Tensor, *,
                  box_loss: str, smooth_l1_beta: float, box_coder: BoxCoder) -> Tensor:
    """Summed box loss of the foreground anchors: deltas ``[B, A, 4]``, anchors ``[A, 4]``, foreground
    ``[B, A]``, gt_index ``[B, A]`` (the matched box of a foreground anchor), gt_boxes ``[B, G, 4]``."""
    matched_boxes = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))  # [B, A, 4]
    anchors = anchors[None].expand_as(matched_boxes)
    # Background anchors regress onto themselves so their (masked-out) terms stay finite.
    matched_boxes = torch.where(foreground[..., None], matched_boxes, anchors)
    if box_loss == "giou":
        pred_boxes = box_coder.decode(box_deltas, anchors)
        per_anchor = giou_loss(pred_boxes, matched_boxes)
    else:
        box_targets = box_coder.encode(matched_boxes, anchors)
        per_anchor = smooth_l1_loss(box_deltas, box_targets, beta=smooth_l1_beta).sum(dim=-1)
    return (per_anchor * foreground).sum()
