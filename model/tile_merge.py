"""Merging the detections of overlapping windows into one set for the whole image.

Each window's detections arrive already shifted into the image's pixels. Three steps:

1. **Cut detections are dropped where a neighbour sees more of the object.** A detection
   within ``edge_margin`` px of an *interior* window edge (one that is not the image
   border) is cut by that edge. If its extent across that edge is under
   ``overlap - 2 * edge_margin`` px (``overlap``: the fewest pixels two neighbouring windows
   share along that axis), the object ends inside the neighbour's share of the image, so
   the neighbour sees a larger part of it: the cut piece is dropped. Along each axis the
   window with the largest origin left of the object (minus the margin) always keeps its
   piece, so every object stays reported; an object whose width and height are at most
   ``overlap - 2 * edge_margin`` lies whole, untouched by any interior edge, in some window,
   and is reported once with its full box (tests/deploy/test_tiling.py).
   **Limit:** an object larger than the overlap is whole in no window; its pieces (each at
   least ``overlap - 2 * edge_margin`` across the seam) are all kept and only merged if
   they overlap enough (NMS: IoU; greedy: intersection over the smaller box). The
   whole-image pass (``TiledDetector(whole_image=True)``) adds such objects whole.
2. **Private detections skip the merge.** A detection lying entirely in the part of its
   window that no other window covers cannot overlap any other window's detection, and the
   model has already suppressed duplicates inside its window: it is kept as it is. Only the
   rest (the detections in the shared bands, and those touching a whole-image detection)
   go through the merge, so a 10000 x 10000 image is not one quadratic NMS over every
   detection.
3. **Merge** the rest, per class: ``"nms"`` keeps the highest-scoring box of each group
   overlapping above ``iou_thresh`` (IoU; ``torchvision.ops.batched_nms``, the model's own
   NMS threshold by default); ``"greedy"`` lets each box, best score first, absorb the
   same-class boxes whose intersection over the smaller box exceeds ``match_thresh``, and
   reports their union with the best score (pieces of one object, or a piece inside a
   whole-image box, become one box).
"""
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from utils.boxes.box_ops import box_ioa

MERGE_METHODS = ("nms", "greedy")
# The default merge: class-aware NMS, the model's own rule. Only this line decides it.
DEFAULT_MERGE = "nms"
GREEDY_MATCH_THRESH = 0.5  # intersection over the smaller box, for "greedy"
EDGE_MARGIN = 2.0  # px of the image: a box ending this close to a window edge counts as cut by it


def axis_frames(positions: list, tile: int, length: int) -> list:
    """Per window origin along one axis: ``(low_interior, high_interior, private_low, private_high)``.

    ``low_interior`` / ``high_interior``: the window's low / high edge lies inside the image (a
    seam, not the border); ``[private_low, private_high]``: the stretch of the axis no other window
    covers (empty when the neighbours overlap, inf at the image's ends).
    """
    frames = []
    for index, start in enumerate(positions):
        private_low = positions[index - 1] + tile if index > 0 else float("-inf")
        private_high = positions[index + 1] if index + 1 < len(positions) else float("inf")
        frames.append((start > 0, start + tile < length, private_low, private_high))
    return frames


def smallest_overlap(positions: list, tile: int) -> int:
    """The fewest pixels two neighbouring windows share along an axis (0 with a single window)."""
    if len(positions) < 2:
        return 0
    return tile - max(b - a for a, b in zip(positions, positions[1:]))


def cut_by_seam(low: Tensor, high: Tensor, start: int, frame: tuple, *, tile: int, overlap: int,
                edge_margin: float) -> Tensor:
    """Detections with extent ``[low, high]`` along one axis (``[D]`` each) in the window starting at
    ``start``: True where an interior edge cuts them and a neighbour sees more of the object (step 1)."""
    low_interior, high_interior = frame[0], frame[1]
    cut = torch.zeros_like(low, dtype=torch.bool)
    if low_interior:
        cut |= low <= start + edge_margin
    if high_interior:
        cut |= high >= start + tile - edge_margin
    return cut & (high - low < overlap - 2 * edge_margin)


def split_window_detections(detections: list, ys: list, xs: list, *, tile: int, height: int, width: int,
                            edge_margin: float = EDGE_MARGIN):
    """Steps 1 and 2 over the windows of one image.

    Args:
        detections: one dict per window, row-major over ``ys x xs`` (window ``k`` starts at
            ``(ys[k // len(xs)], xs[k % len(xs)])``): "boxes" ``FloatTensor[D, 4]`` x1y1x2y2 in the
            image's pixels, "scores" ``[D]``, "labels" ``Int64Tensor[D]``.

    Returns:
        ``(private, shared)``: two dicts of the same keys, the detections that skip the merge and
        those that go through it; cut pieces are in neither.
    """
    rows, cols = axis_frames(ys, tile, height), axis_frames(xs, tile, width)
    overlap_y, overlap_x = smallest_overlap(ys, tile), smallest_overlap(xs, tile)
    private, shared = [], []
    for index, found in enumerate(detections):
        row, col = divmod(index, len(xs))
        x1, y1, x2, y2 = found["boxes"].unbind(-1)
        cut = (cut_by_seam(x1, x2, xs[col], cols[col], tile=tile, overlap=overlap_x, edge_margin=edge_margin)
               | cut_by_seam(y1, y2, ys[row], rows[row], tile=tile, overlap=overlap_y, edge_margin=edge_margin))
        alone = ((x1 >= cols[col][2]) & (x2 <= cols[col][3]) & (y1 >= rows[row][2]) & (y2 <= rows[row][3]))
        private.append(select(found, alone & ~cut))
        shared.append(select(found, ~alone & ~cut))
    return concatenate(private), concatenate(shared)


def select(detections: dict, keep: Tensor) -> dict:
    return {key: detections[key][keep] for key in ("boxes", "scores", "labels")}


def concatenate(parts: list) -> dict:
    return {key: torch.cat([part[key] for part in parts]) for key in ("boxes", "scores", "labels")}


def touching(boxes: Tensor, others: Tensor) -> Tensor:
    """``[D, 4]`` x ``[M, 4]`` -> ``BoolTensor[D]``: the boxes that share some area with one of ``others``."""
    if not len(others) or not len(boxes):
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    return (box_ioa(boxes, others) > 0).any(dim=1)


def merge_detections(detections: dict, *, method: str, iou_thresh: float,
                     match_thresh: float = GREEDY_MATCH_THRESH) -> dict:
    """Step 3: ``{"boxes" [D, 4], "scores" [D], "labels" [D]}`` -> the merged set (any order)."""
    if method == "nms":
        keep = batched_nms(detections["boxes"], detections["scores"], detections["labels"], iou_thresh)
        return select(detections, keep)
    if method == "greedy":
        return greedy_merge(detections, match_thresh=match_thresh)
    raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")


def greedy_merge(detections: dict, *, match_thresh: float) -> dict:
    """Best score first, each unmerged box absorbs the unmerged boxes of its class whose intersection
    over the smaller of the two boxes exceeds ``match_thresh``; it becomes their union, keeping its score.

    Compared with the box's own extent, not the growing union, so a chain of overlapping
    boxes is not swallowed whole. O(D^2) time per class, O(D) memory.
    """
    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    out_boxes, out_scores, out_labels = [], [], []
    for label in labels.unique():
        mine = (labels == label).nonzero()[:, 0]
        order = mine[scores[mine].argsort(descending=True, stable=True)]
        class_boxes = boxes[order]
        merged = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
        for i in range(len(order)):
            if merged[i]:
                continue
            box = class_boxes[i:i + 1]
            smaller_share = torch.maximum(box_ioa(box, class_boxes)[0], box_ioa(class_boxes, box)[:, 0])
            members = ~merged & (smaller_share > match_thresh)
            members[i] = True
            merged |= members
            group = class_boxes[members]
            out_boxes.append(torch.cat([group[:, :2].min(dim=0).values, group[:, 2:].max(dim=0).values]))
            out_scores.append(scores[order[i]])
            out_labels.append(label)
    if not out_boxes:
        return {"boxes": boxes.new_zeros((0, 4)), "scores": scores.new_zeros(0), "labels": labels.new_zeros(0)}
    return {"boxes": torch.stack(out_boxes), "scores": torch.stack(out_scores), "labels": torch.stack(out_labels)}
