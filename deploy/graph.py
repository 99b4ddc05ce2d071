"""The whole RetinaNet as one traceable forward: a uint8 image in, its detections out.

:class:`DeployableRetinaNet` wraps a built :class:`model.retinanet.RetinaNet` (sharing its
modules and weights) and redoes, for one image, what ``RetinaNet.forward`` does around
the backbone, FPN and heads, in operations every exporter can record with their
shapes left free:

- resize, normalise and pad as ``model.transform`` does in eval mode, with the target
  size computed in float64 like Python computes it in eager mode (a float32 size is one
  pixel short for about 7% of image sizes, since ``floor(97 * (800 / 97))`` is 799);
- anchors from the padded size and the feature sizes (no cache keyed by Python ints);
- per-level top-k with ``k = min(topk_candidates, candidates of the level)`` taken on
  the traced size (torchvision guards the same for tracing), decoding with the
  model's own box coder, clipping, the score threshold, class-aware NMS (one
  ``torchvision.ops.nms``, i.e. ONNX ``NonMaxSuppression``, with boxes of different
  classes shifted apart) and the ``detections_per_img`` cap.

Shapes come from :func:`_size` and :func:`_resized_size`: under ``torch.jit`` tracing
(the TorchScript exporter) they are traced tensors, in eager mode and under
``torch.export`` Python / symbolic ints, so one forward serves eager checks and
both exporters. ``RetinaNet`` itself is untouched: its eager behaviour is what the
exported graph is compared against.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from model.retinanet import RetinaNet
from ops.fast_trunk import FastResNetTrunk
from ops.winograd import WinogradConv2d


def _size(tensor: Tensor, dim: int):
    """``tensor.shape[dim]``, as a traced int64 tensor while tracing so that it stays dynamic."""
    if torch.jit.is_tracing():
        return torch._shape_as_tensor(tensor)[dim]
    return tensor.shape[dim]


def _resized_size(height, width, min_size: int, max_size: int):
    """``(floor(height * s), floor(width * s))``, ``s = min(min_size / short, max_size / long)``,
    exactly as ``ImageBatcher`` computes it in eager mode (float64 arithmetic)."""
    if torch.jit.is_tracing():
        # [1]-shaped, not 0-dim: the exporter computes 0-dim ("scalar") tensors in float32. And
        # tensor / tensor, since number / tensor is a reciprocal then a product (another rounding).
        h, w = height.reshape(1).to(torch.float64), width.reshape(1).to(torch.float64)
        min_side, max_side = torch.full_like(h, min_size), torch.full_like(h, max_size)
        scale = torch.minimum(min_side / torch.minimum(h, w), max_side / torch.maximum(h, w))
        return torch.floor(h * scale).long().reshape(()), torch.floor(w * scale).long().reshape(())
    # torch.sym_min keeps symbolic sizes (torch.export) symbolic; on ints it is min().
    scale = torch.sym_min(min_size / torch.sym_min(height, width), max_size / torch.sym_max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def _as_float(value) -> Tensor:
    """A size (int, symbolic int or traced tensor) as a float32 scalar tensor."""
    if isinstance(value, Tensor):
        return value.to(torch.float32)
    return torch.full((), value, dtype=torch.float32)


def _as_long(value) -> Tensor:
    """A size as an int64 scalar tensor."""
    if isinstance(value, Tensor):
        return value.to(torch.int64)
    return torch.full((), value, dtype=torch.int64)


class DeployableRetinaNet(nn.Module):
    """One image in, detections out; the detector of ``model`` with its pre- and post-processing.

    Args:
        model: a :class:`RetinaNet` as built or loaded (``model.weights.load_detector``),
            in eval mode and not passed through ``optimize_for``: its fast CPU kernels are
            eager-only code, and the runtime does its own fusion (BatchNorm into the convs).

    ``forward(image)``: ``ByteTensor[3, H, W]`` RGB, any ``H, W`` ->
    ``(boxes FloatTensor[D, 4], scores FloatTensor[D], labels Int64Tensor[D])``, boxes
    ``x1, y1, x2, y2`` in the input image's pixels, labels in ``[0, num_classes)``, sorted
    by decreasing score, ``D <= detections_per_img``; the same as ``model([image])[0]``
    up to float rounding.
    """

    def __init__(self, model: RetinaNet):
        super().__init__()
        if isinstance(model.backbone.body, FastResNetTrunk) or any(
                isinstance(m, WinogradConv2d) for m in model.modules()):
            raise ValueError("export the model as loaded, before RetinaNet.optimize_for: its CPU kernels are "
                             "eager-only code")
        transform = model.transform
        self.backbone, self.fpn, self.head, self.box_coder = model.backbone, model.fpn, model.head, model.box_coder
        self.min_size, self.max_size = transform.min_size[-1], transform.max_size  # eval uses the largest min_size
        self.size_divisible, self.fixed_size = transform.size_divisible, transform.fixed_size
        self.register_buffer("image_mean", transform.image_mean.detach().clone(), persistent=False)
        self.register_buffer("image_std", transform.image_std.detach().clone(), persistent=False)
        generator = model.anchor_generator
        cells = torch.stack([generator.cell_anchors(level) for level in range(len(generator.sizes))])
        self.register_buffer("cell_anchors", cells, persistent=False)  # [L, A, 4]
        self.num_classes = model.num_classes
        self.score_thresh, self.nms_thresh = float(model.score_thresh), float(model.nms_thresh)
        self.detections_per_img, self.topk_candidates = int(model.detections_per_img), int(model.topk_candidates)

    def preprocess(self, image: Tensor):
        """``uint8 [3, H, W]`` -> (batch ``[1, 3, H_pad, W_pad]``, resized (h, w), original (H, W))."""
        height, width = _size(image, 1), _size(image, 2)
        x = image.to(torch.float32).div(255)[None]
        if self.fixed_size is not None:
            new_h, new_w = self.fixed_size
        else:
            new_h, new_w = _resized_size(height, width, self.min_size, self.max_size)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = (x - self.image_mean) / self.image_std
        divisible = self.size_divisible
        pad_h = (new_h + divisible - 1) // divisible * divisible - new_h
        pad_w = (new_w + divisible - 1) // divisible * divisible - new_w
        # Zeros after normalisation, bottom/right only, as ImageBatcher pads.
        return F.pad(x, (0, pad_w, 0, pad_h)), (new_h, new_w), (height, width)

    def anchors(self, batch: Tensor, features: list) -> Tensor:
        """``[sum_l H_l * W_l * A, 4]`` xyxy in the padded frame; the layout of ``AnchorGenerator``."""
        padded_h, padded_w = _size(batch, 2), _size(batch, 3)
        per_level = []
        for level, feature in enumerate(features):
            height, width = _size(feature, 2), _size(feature, 3)
            stride_y, stride_x = padded_h // height, padded_w // width
            shifts_x = torch.arange(width, dtype=torch.float32, device=batch.device) * stride_x
            shifts_y = torch.arange(height, dtype=torch.float32, device=batch.device) * stride_y
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            per_level.append((shifts + self.cell_anchors[level][None]).reshape(-1, 4))
        return torch.cat(per_level)

    def select_candidates(self, cls_logits: list):
        """Per level ``[1, N_l, K]`` logits -> top-k (logits ``[C]``, anchor indices ``[C]``, labels ``[C]``)."""
        logits_out, anchors_out, labels_out = [], [], []
        start = 0
        for level_logits in cls_logits:
            flat = level_logits.reshape(-1)  # [N_l * K]
            num_candidates = _size(flat, 0)
            if isinstance(num_candidates, Tensor):  # traced: k must follow the image size
                k = torch.clamp(num_candidates, max=self.topk_candidates)
            else:
                k = torch.sym_min(self.topk_candidates, num_candidates)
            top_logits, flat_idx = flat.topk(k)
            logits_out.append(top_logits)
            anchors_out.append(torch.div(flat_idx, self.num_classes, rounding_mode="floor") + start)
            labels_out.append(flat_idx % self.num_classes)
            start = start + _size(level_logits, 1)
        return torch.cat(logits_out), torch.cat(anchors_out), torch.cat(labels_out)

    def forward(self, image: Tensor):
        batch, (new_h, new_w), (height, width) = self.preprocess(image)
        features = self.fpn(self.backbone(batch))
        cls_logits, box_deltas = self.head.per_level(features)
        anchors = self.anchors(batch, features)

        logits, anchor_idx, labels = self.select_candidates(cls_logits)
        scores = torch.sigmoid(logits.float())
        deltas = torch.cat(box_deltas, dim=1)[0][anchor_idx]  # [C, 4]
        boxes = self.box_coder.decode(deltas, anchors[anchor_idx])
        limits = torch.stack([_as_float(new_w), _as_float(new_h), _as_float(new_w), _as_float(new_h)])
        boxes = torch.minimum(boxes.clamp(min=0), limits)

        keep = scores > self.score_thresh
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # Class-aware NMS in one call: every class moved to its own region, farther apart than
        # any clipped box is wide, so boxes of different classes never overlap.
        offsets = labels.to(torch.float32) * (torch.maximum(limits[0], limits[1]) + 1)
        kept = nms(boxes + offsets[:, None], scores, self.nms_thresh)[:self.detections_per_img]
        boxes, scores, labels = boxes[kept], scores[kept], labels[kept]

        # Back to the input image's pixels; the ratios in float64 as in eager mode.
        sizes = torch.stack([_as_long(width), _as_long(height), _as_long(new_w), _as_long(new_h)]).to(torch.float64)
        ratio = (sizes[:2] / sizes[2:]).to(torch.float32).repeat(2)  # [4]: w, h, w, h
        return boxes * ratio, scores, labels

