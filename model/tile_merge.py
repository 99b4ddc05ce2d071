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
   go through the merge.
3. **Merge** the rest, per class: ``"nms"`` is class-aware NMS (IoU above ``iou_thresh``,
   the model's own NMS threshold by default; the same survivors as
   ``torchvision.ops.batched_nms``); ``"greedy"`` lets each box, best score first, absorb the
   unabsorbed same-class boxes whose intersection over the smaller box exceeds
   ``match_thresh``, and reports their union with its score, pass after pass until nothing
   matches (pieces of one object, or pieces inside a whole-image box, become one box). Both
   compare a box only with the boxes near it on a grid (:func:`matching_pairs`), so the work
   grows with the number of detections, not with its square: a 10000 x 10000 image has a
   few hundred thousand.
"""
import torch
from torch import Tensor

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


def merge_detections(detections: dict, *, method: str, iou_thresh: float, match_thresh: float = GREEDY_MATCH_THRESH,
                     cell_limit: float = None) -> dict:
    """Step 3: ``{"boxes" [D, 4], "scores" [D], "labels" [D]}`` -> the merged set (any order).

    Best score first (the larger box first among equal scores: it has seen more of the object).
    ``"greedy"`` repeats its pass over the unions until no two boxes of a class overlap above
    ``match_thresh``: a union that has grown over a seam then absorbs the pieces on the other
    side, which the first pass compared with a smaller box. ``cell_limit``: boxes wider or taller
    than this (whole-image detections, grown unions) are compared with every box of their
    class; the rest only with their neighbours on a grid (:func:`matching_pairs`).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
    metric, thresh = ("iou", iou_thresh) if method == "nms" else ("ios", match_thresh)
    while True:
        boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
        first, second = matching_pairs(boxes, labels, metric=metric, thresh=thresh, cell_limit=cell_limit)
        if not len(first):
            return detections
        owner = claim_in_order(merge_order(boxes, scores), first, second)
        keepers = (owner == torch.arange(len(owner), device=owner.device)).nonzero()[:, 0]
        if method == "nms":
            return select(detections, keepers)
        union = boxes.new_zeros((len(boxes), 4))  # each keeper becomes the union of the boxes it claimed
        union[:, :2] = float("inf")
        union[:, 2:] = float("-inf")
        for column, reduce in ((0, "amin"), (1, "amin"), (2, "amax"), (3, "amax")):
            union[:, column].scatter_reduce_(0, owner, boxes[:, column], reduce=reduce)
        detections = {"boxes": union[keepers], "scores": scores[keepers], "labels": labels[keepers]}


def merge_order(boxes: Tensor, scores: Tensor) -> list:
    """Indices by decreasing score, and by decreasing area among equal scores."""
    by_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argsort(descending=True, stable=True)
    return by_area[scores[by_area].argsort(descending=True, stable=True)].tolist()


def claim_in_order(order: list, first: Tensor, second: Tensor) -> Tensor:
    """In ``order``, each box not yet claimed claims itself and every unclaimed box it is paired with
    (``first[p]`` with ``second[p]``); ``LongTensor[D]``: the claiming box of each. With IoU pairs the
    boxes that claim themselves are exactly NMS's survivors; with intersection-over-smaller pairs,
    greedy merging's groups."""
    count = len(order)
    ends = torch.cumsum(torch.bincount(torch.cat([first, second]).cpu(), minlength=count), 0).tolist()
    both = torch.cat([first, second]).cpu()
    partners = torch.cat([second, first]).cpu()[both.argsort(stable=True)].tolist()
    owner = [-1] * count
    for box in order:
        if owner[box] >= 0:
            continue
        owner[box] = box
        for partner in partners[ends[box - 1] if box else 0:ends[box]]:
            if owner[partner] < 0:
                owner[partner] = box
    return torch.tensor(owner, dtype=torch.int64, device=first.device)


# Forward neighbours on the grid: each pair of neighbouring cells is visited once.
_NEIGHBOURS = ((0, 0), (0, 1), (1, -1), (1, 0), (1, 1))
MAX_CANDIDATES = 1 << 22  # candidate pairs compared at once: bounds the merge's memory


def matching_pairs(boxes: Tensor, labels: Tensor, *, metric: str, thresh: float, cell_limit: float = None):
    """``(first, second)`` ``LongTensor[P]``: the pairs of same-label boxes whose overlap ``metric``
    ("iou", or "ios": intersection over the smaller box) exceeds ``thresh``, each pair once.

    Boxes no larger than the grid cell (the largest extent among the boxes up to ``cell_limit``)
    can only overlap a box whose top-left corner lies in the same or a neighbouring cell: the
    candidates are found by sorting cell keys, never by comparing all ``D^2`` pairs. Larger boxes
    are compared with every box of their class.
    """
    extent = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1)
    large = extent > cell_limit if cell_limit is not None else torch.zeros_like(extent, dtype=torch.bool)
    small = (~large).nonzero()[:, 0]
    pairs = [_grid_pairs(boxes, labels, small, metric=metric, thresh=thresh)]
    for box in large.nonzero()[:, 0]:
        others = ((labels == labels[box]) & (torch.arange(len(boxes), device=boxes.device) != box)).nonzero()[:, 0]
        mine = box.expand_as(others)
        keep = _overlap(boxes[mine], boxes[others], metric) > thresh
        pairs.append((mine[keep], others[keep]))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _grid_pairs(boxes: Tensor, labels: Tensor, index: Tensor, *, metric: str, thresh: float):
    empty = index.new_zeros(0)
    if len(index) < 2:
        return empty, empty
    boxes, labels = boxes[index], labels[index]
    cell = max(float((boxes[:, 2:] - boxes[:, :2]).amax()), 1.0)
    column, row = (boxes[:, 0] / cell).floor().long(), (boxes[:, 1] / cell).floor().long()
    # An empty column and row past the last keep neighbour keys inside the same label's block.
    num_columns, num_rows = int(column.max()) + 2, int(row.max()) + 2
    keys, order = ((labels * num_rows + row) * num_columns + column).sort(stable=True)
    ranges = []
    for d_row, d_column in _NEIGHBOURS:
        target = keys + d_row * num_columns + d_column
        low = torch.searchsorted(keys, target, right=False)
        if (d_row, d_column) == (0, 0):
            low = torch.arange(1, len(keys) + 1, device=keys.device)  # after itself in its own cell
        high = torch.searchsorted(keys, target, right=True)
        ranges.append((low, (high - low).clamp(min=0)))
    firsts, seconds = [], []
    totals = sum(count for _, count in ranges).cumsum(0)  # candidates up to each position
    steps = torch.tensor(range(MAX_CANDIDATES, int(totals[-1]), MAX_CANDIDATES), dtype=totals.dtype,
                         device=keys.device)
    bounds = sorted({0, len(keys), *torch.searchsorted(totals, steps).tolist()})
    for start, stop in zip(bounds, bounds[1:]):  # chunks of about MAX_CANDIDATES candidates
        for low, count in ranges:
            # Candidate k belongs to position `which` (+ start), `offset` steps into its range.
            # (searchsorted, not repeat_interleave: the latter costs milliseconds even on tiny inputs)
            ends = count[start:stop].cumsum(0)
            candidate = torch.arange(int(ends[-1]), device=keys.device)
            which = torch.searchsorted(ends, candidate, right=True)
            offset = candidate - (ends - count[start:stop])[which]
            first, second = order[start + which], order[low[start:stop][which] + offset]
            keep = _overlap(boxes[first], boxes[second], metric) > thresh
            firsts.append(index[first[keep]])
            seconds.append(index[second[keep]])
    return torch.cat(firsts), torch.cat(seconds)


def _overlap(boxes1: Tensor, boxes2: Tensor, metric: str) -> Tensor:
    """Elementwise ``[P, 4]`` x ``[P, 4]`` -> ``[P]``: IoU, or intersection over the smaller area ("ios")."""
    width = (torch.minimum(boxes1[:, 2], boxes2[:, 2]) - torch.maximum(boxes1[:, 0], boxes2[:, 0])).clamp(min=0)
    height = (torch.minimum(boxes1[:, 3], boxes2[:, 3]) - torch.maximum(boxes1[:, 1], boxes2[:, 1])).clamp(min=0)
    inter = width * height
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    tiny = torch.finfo(inter.dtype).tiny
    if metric == "iou":
        return inter / (area1 + area2 - inter).clamp(min=tiny)
    return inter / torch.minimum(area1, area2).clamp(min=tiny)
