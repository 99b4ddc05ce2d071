"""RetinaNet classification and box subnets, shared across pyramid levels."""
import math

import torch
from torch import nn


def _tower(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers = []
    for _ in range(num_convs):
        # A conv followed by GroupNorm needs no bias: the norm's shift replaces it.
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm is None))
        if norm == "gn":
            layers.append(nn.GroupNorm(32 if channels % 32 == 0 else 8, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def prior_bias(prior_prob: float) -> float:
    """Classification bias that makes every sigmoid start at ``prior_prob``; 0 (no prior) for 0."""
    return -math.log((1 - prior_prob) / prior_prob) if prior_prob > 0 else 0.0


class RetinaNetHead(nn.Module):
    """Two small FCNs applied to every pyramid level (paper section 4, "Classification Subnet").

    Args:
        in_channels: channels of the FPN levels.
        num_anchors: anchors per location A (9 in the paper).
        num_classes: K foreground classes (no background class: sigmoid outputs).
        num_convs: 3x3 conv + ReLU layers in each tower (4 in the paper).
        norm: None or "gn" (GroupNorm(32) after each tower conv, as in torchvision v2).
        prior_prob: initial foreground probability pi; the classification bias
            starts at -log((1 - pi) / pi) so the ~10^5 easy negatives do not swamp
            the first iterations with a huge loss (paper section 4.1, "Initialization").
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm: str = None, prior_prob: float = 0.01):
        super().__init__()
        if norm not in (None, "gn"):
            raise ValueError(f"head norm must be None or 'gn', got {norm!r}")
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.cls_tower = _tower(in_channels, num_convs, norm)
        self.box_tower = _tower(in_channels, num_convs, norm)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, prior_bias(prior_prob))

    def forward(self, features: list):
        """``[P_l [B, C, H_l, W_l]]`` -> (cls_logits ``[B, sum_l H_l W_l A, K]``,
        box_deltas ``[B, sum_l H_l W_l A, 4]``), location-major then anchor, the order
        of :class:`model.anchors.AnchorGenerator`.
        """
        cls_per_level, box_per_level = self.per_level(features)
        return torch.cat(cls_per_level, dim=1), torch.cat(box_per_level, dim=1)

    def per_level(self, features: list) -> tuple:
        """The same outputs as ``forward``, one ``[B, H_l W_l A, K]`` / ``[B, H_l W_l A, 4]`` tensor
        per level: inference ranks each level on its own and need not pay for the concatenation."""
        cls_per_level, box_per_level = [], []
        for feature in features:
            cls_per_level.append(_flatten(self.cls_logits(self.cls_tower(feature)), self.num_classes))
            box_per_level.append(_flatten(self.bbox_pred(self.box_tower(feature)), 4))
        return cls_per_level, box_per_level


def _flatten(x: torch.Tensor, channels_per_anchor: int) -> torch.Tensor:
    """``[B, A*C, H, W]`` -> ``[B, H*W*A, C]``; a view, not a copy, when x is channels_last."""
    batch, _, height, width = x.shape
    x = x.view(batch, -1, channels_per_anchor, height, width).permute(0, 3, 4, 1, 2)
    return x.reshape(batch, -1, channels_per_anchor)
