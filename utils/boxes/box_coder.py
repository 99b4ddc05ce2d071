"""Box coding: ground-truth boxes <-> regression deltas relative to anchors.

The detector (decoding its predictions) and the loss (encoding its targets, or decoding
for GIoU) share one :class:`BoxCoder`, so both always use the same ``bbox_reg_weights``.
It sits here, below both ``model/`` and ``losses/``, as torchvision keeps its BoxCoder
in ``models/detection/_utils.py``.
"""
from torch import Tensor

from utils.boxes.box_ops import BBOX_XFORM_CLIP, decode_boxes, encode_boxes


class BoxCoder:
    """``(dx, dy, dw, dh)`` deltas weighted by ``weights`` (1, 1, 1, 1 in RetinaNet).

    Args:
        weights: multipliers of the four deltas.
        clip: upper bound of the decoded log-size deltas (``exp`` must not overflow).
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), clip: float = BBOX_XFORM_CLIP):
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != 4:
            raise ValueError(f"bbox_reg_weights needs 4 values, got {len(self.weights)}")
        self.clip = clip

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """``[..., 4]`` xyxy boxes and anchors -> ``[..., 4]`` deltas."""
        return encode_boxes(gt_boxes, anchors, self.weights)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """``[..., 4]`` deltas and anchors -> ``[..., 4]`` xyxy boxes, in the anchors' dtype."""
        return decode_boxes(deltas, anchors, self.weights, self.clip)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights})"
