"""How well a model's anchors fit a dataset's boxes, measured before any training.

RetinaNet learns a box from the anchors whose IoU with it reaches ``fg_iou_thresh``
(0.5). A box whose best anchor stays below that is only kept by the low-quality
match (``allow_low_quality_matches``): one poorly placed positive instead of several
good ones, the usual reason a detector misses small objects (yhenon/pytorch-retinanet
#118, fizyr/keras-retinanet #887). The *coverage* is the share of ground-truth boxes
whose best anchor reaches a threshold, at the training resolution, with the anchors
the model would build (``model.anchors.AnchorGenerator``, same sizes, rounding and
grid as in training).

The best anchor of a box is found without enumerating the grid: for anchors of one
shape, the IoU with a box only falls as the centres move apart along x or along y,
so on every level and for every cell anchor the best location is the grid point
nearest the box centre (clamped to the map). That gives ``levels x anchors per
location`` candidates per box (45 for the paper's settings), scored with one batched
``box_iou``: COCO train2017's 860k boxes take seconds, and ``tests/model/test_anchor_coverage.py``
checks the result against the full grid.

Boxes are ``FloatTensor[G, 4]`` absolute ``x1, y1, x2, y2`` in the pixels of their own
image, as ``CocoDetection`` hands them out.
"""
import math
from dataclasses import KW_ONLY, dataclass

import torch

from model.anchors import AnchorGenerator, default_anchor_sizes
from model.config import ModelConfig
from utils.boxes.box_ops import box_iou

FIRST_LEVEL = 3  # P3, stride 8: the finest pyramid level RetinaNet predicts from
# sqrt(area) ranges at the training resolution, in pixels (the anchor sizes double per level).
SIZE_RANGES = ((0, 16), (16, 32), (32, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))
POOR_COVERAGE = 0.9   # below this share at the foreground threshold, look for better settings
_CHUNK = 65536        # boxes per batched IoU call: [chunk, 1, candidates] stays a few MB


@dataclass
class BoxSet:
    """The boxes to check. ``boxes`` ``FloatTensor[G, 4]`` xyxy in original pixels, ``labels``
    ``Int64Tensor[G]``, ``image_index`` ``Int64Tensor[G]`` (row in ``image_sizes``),
    ``image_sizes`` ``FloatTensor[I, 2]`` (height, width) of the original images."""
    boxes: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    image_sizes: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset, max_images: int = None, seed: int = 0) -> "BoxSet":
        """From any dataset with ``box_arrays()`` (``coco_dataset.CocoDetection``); see :meth:`from_arrays`."""
        return cls.from_arrays(dataset.box_arrays(), max_images, seed)

    @classmethod
    def from_arrays(cls, arrays: dict, max_images: int = None, seed: int = 0) -> "BoxSet":
        """From ``CocoDetection.box_arrays()`` (non-crowd boxes); ``max_images`` draws that many
        images at random (seeded) from a larger dataset."""
        boxes, labels = torch.as_tensor(arrays["boxes"]), torch.as_tensor(arrays["labels"])
        image_index, image_sizes = torch.as_tensor(arrays["image_index"]), torch.as_tensor(arrays["image_sizes"])
        num_images = len(image_sizes)
        if max_images is not None and num_images > max_images:
            chosen = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:max_images]
            new_index = torch.full((num_images,), -1, dtype=torch.long)
            new_index[chosen] = torch.arange(max_images)
            keep = new_index[image_index] >= 0
            boxes, labels, image_index = boxes[keep], labels[keep], new_index[image_index[keep]]
            image_sizes = image_sizes[chosen]
        return cls(boxes.float(), labels.long(), image_index.long(), image_sizes.double())

    def sample(self, max_boxes: int, seed: int = 0) -> "BoxSet":
        """At most ``max_boxes`` of the boxes, drawn at random (seeded); ``self`` when it has no more."""
        if len(self.boxes) <= max_boxes:
            return self
        chosen = torch.randperm(len(self.boxes), generator=torch.Generator().manual_seed(seed))[:max_boxes]
        return BoxSet(self.boxes[chosen], self.labels[chosen], self.image_index[chosen], self.image_sizes)


def training_image_sizes(image_sizes: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """``[I, 2]`` (height, width) after ``model.transform.ImageBatcher``'s training resize.

    Multi-scale training (several ``min_size``) draws a size per image; here image ``i``
    takes ``min_size[i % n]``, so every training size is represented evenly. A model trained
    on crops (``crop_size`` > 0) sees its boxes at their size in the image scaled by
    ``crop_scale``, never resized to ``min_size``: its windows are cut from that image, and
    a window's grid sits at a random offset, as random relative to a box as the box's own
    place in the image, so the scaled image's grid gives the same share in expectation.
    """
    image_sizes = image_sizes.double()
    if config.crop_size:
        return torch.floor(image_sizes * config.crop_scale)
    if config.fixed_size:
        return torch.tensor(config.fixed_size, dtype=torch.float64).expand_as(image_sizes).clone()
    min_sizes = config.min_size if isinstance(config.min_size, tuple) else (config.min_size,)
    short = torch.tensor(min_sizes, dtype=torch.float64)[torch.arange(len(image_sizes)) % len(min_sizes)]
    scale = torch.minimum(short / image_sizes.min(dim=1).values, config.max_size / image_sizes.max(dim=1).values)
    # F.interpolate(recompute_scale_factor=True) makes the output floor(size * scale), in double precision.
    return torch.floor(image_sizes * scale[:, None])


def feature_grid(padded_sizes: torch.Tensor, num_levels: int):
    """``(grid sizes, strides)``, each ``Int64Tensor[I, L, 2]`` (y, x), of P3.. for padded inputs ``[I, 2]``.

    Every stride-2 conv of the trunk and of P6/P7 (kernel 3 or 7, "same" padding) maps
    n to ceil(n / 2), so level l has ceil(n / 2^l) cells; the stride is taken as the
    ``AnchorGenerator`` takes it, ``padded // cells``.
    """
    padded = padded_sizes.long()[:, None, :]                                              # [I, 1, 2]
    divisors = (2 ** torch.arange(FIRST_LEVEL, FIRST_LEVEL + num_levels)).view(1, -1, 1)  # [1, L, 1]
    cells = -(-padded // divisors)                                                        # ceil division
    return cells, padded // cells


def best_anchor_iou(boxes: torch.Tensor, padded_sizes: torch.Tensor, generator: AnchorGenerator) -> torch.Tensor:
    """Highest IoU of each box with any anchor of its (padded) input: ``FloatTensor[G]``.

    Args:
        boxes: ``[G, 4]`` xyxy at the training resolution.
        padded_sizes: ``[G, 2]`` (height, width) of the padded input each box lies in.
        generator: the anchors (sizes per level, aspect ratios) to score.
    """
    num_levels = len(generator.sizes)
    cells = [generator.cell_anchors(level) for level in range(num_levels)]                # L x [A, 4]
    best = torch.zeros(len(boxes))
    for start in range(0, len(boxes), _CHUNK):
        chunk, padded = boxes[start:start + _CHUNK].float(), padded_sizes[start:start + _CHUNK]
        grid, strides = feature_grid(padded, num_levels)                                   # [G, L, 2] (y, x)
        centres = torch.stack(((chunk[:, 0] + chunk[:, 2]) / 2, (chunk[:, 1] + chunk[:, 3]) / 2), dim=1)  # x, y
        # The grid point nearest each centre, per level: anchors sit at (j * stride_x, i * stride_y).
        index = torch.round(centres[:, None, :] / strides.flip(-1)).clamp(min=0)
        index = torch.minimum(index, (grid.flip(-1) - 1).to(index.dtype))                  # [G, L, 2] (x, y)
        shifts = (index * strides.flip(-1)).float().repeat(1, 1, 2)                        # [G, L, 4]
        candidates = torch.cat([shifts[:, level, None, :] + cells[level][None] for level in range(num_levels)],
                               dim=1)                                                      # [G, L * A, 4]
        best[start:start + len(chunk)] = box_iou(chunk[:, None, :], candidates)[:, 0].max(dim=1).values
    return best


@dataclass
class Coverage:
    """Best-anchor IoU of every box (``best_iou`` ``[G]``), with its size at the training resolution
    (``box_size`` = sqrt(area), ``[G]``) and ``labels`` ``[G]``."""
    best_iou: torch.Tensor
    box_size: torch.Tensor
    labels: torch.Tensor
    _: KW_ONLY  # the two thresholds by name: swapped, every share would still look plausible
    fg_iou_thresh: float
    bg_iou_thresh: float

    def share(self, thresh: float, mask: torch.Tensor = None) -> float:
        """Share of the boxes (those in ``mask``) whose best anchor IoU reaches ``thresh``; nan if none."""
        values = self.best_iou if mask is None else self.best_iou[mask]
        return float((values >= thresh).float().mean()) if len(values) else float("nan")

    @property
    def fg(self) -> float:
        return self.share(self.fg_iou_thresh)

    def by_size(self) -> list:
        """``[(low, high, num_boxes, share >= fg, share >= bg)]`` for each of ``SIZE_RANGES``."""
        rows = []
        for low, high in SIZE_RANGES:
            mask = (self.box_size >= low) & (self.box_size < high)
            rows.append((low, high, int(mask.sum()), self.share(self.fg_iou_thresh, mask),
                         self.share(self.bg_iou_thresh, mask)))
        return rows

    def by_class(self, num_classes: int) -> list:
        """``[(num_boxes, share >= fg, share >= bg)]`` per label."""
        return [(int((self.labels == k).sum()), self.share(self.fg_iou_thresh, self.labels == k),
                 self.share(self.bg_iou_thresh, self.labels == k)) for k in range(num_classes)]


def measure_coverage(box_set: BoxSet, config: ModelConfig) -> Coverage:
    """Coverage of ``box_set`` by the anchors of ``config`` at its training resolution."""
    resized = training_image_sizes(box_set.image_sizes, config)                            # [I, 2]
    padded = torch.ceil(resized / config.size_divisible) * config.size_divisible
    ratio = (resized / box_set.image_sizes.double()).flip(-1).repeat(1, 2)                 # [I, 4] (x, y, x, y)
    boxes = (box_set.boxes.double() * ratio[box_set.image_index]).float()
    generator = AnchorGenerator(default_anchor_sizes(config.anchor_base_sizes, config.scales_per_octave),
                                aspect_ratios=config.aspect_ratios)
    best = best_anchor_iou(boxes, padded[box_set.image_index], generator)
    box_size = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    return Coverage(best, box_size, box_set.labels, fg_iou_thresh=config.fg_iou_thresh,
                    bg_iou_thresh=config.bg_iou_thresh)


@dataclass(frozen=True)
class Suggestion:
    """Settings that raise the coverage: ``changes`` maps ModelConfig fields to new values."""
    changes: dict
    coverage: float   # share of the boxes >= fg_iou_thresh with these settings

    def flags(self) -> list:
        """The train.py options that apply it, e.g. ``["--anchor-base-sizes", "16", "32", ...]``."""
        flags = []
        for field, value in self.changes.items():
            flags.append("--" + field.replace("_", "-"))
            flags += [_format(v) for v in value] if isinstance(value, (tuple, list)) else [_format(value)]
        return flags


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _candidates(config: ModelConfig):
    """``(cost, changes)`` for the settings worth trying, cheapest first within a kind of change.

    Smaller anchors cost nothing; more scales per octave or aspect ratios add anchors
    (a larger head output); a larger input size costs compute with its square, and so does
    a larger ``crop_scale`` for a model trained on crops (more windows per image).
    """
    min_sizes = config.min_size if isinstance(config.min_size, tuple) else (config.min_size,)
    ratios = tuple(sorted(set(config.aspect_ratios) | {0.25, 4.0}))
    for size_factor in (1, 1.5, 2) if not config.fixed_size else (1,):
        for extra_scales in (0, 1):
            for ratio_set in (config.aspect_ratios, ratios):
                for base_factor in (1, 0.5, 0.25):
                    changes = {}
                    if base_factor != 1:
                        changes["anchor_base_sizes"] = tuple(max(1, round(b * base_factor))
                                                             for b in config.anchor_base_sizes)
                    if extra_scales:
                        changes["scales_per_octave"] = config.scales_per_octave + extra_scales
                    if ratio_set != config.aspect_ratios:
                        changes["aspect_ratios"] = ratio_set
                    if size_factor != 1 and config.crop_size:  # crops: the images' scale, not the window
                        changes["crop_scale"] = config.crop_scale * size_factor
                    elif size_factor != 1:
                        changes["min_size"] = tuple(round(s * size_factor) for s in min_sizes)
                        changes["max_size"] = round(config.max_size * size_factor)
                    if changes or size_factor == 1:
                        anchors = (config.scales_per_octave + extra_scales) * len(ratio_set)
                        cost = size_factor ** 2 * anchors / (config.scales_per_octave * len(config.aspect_ratios))
                        yield cost + 0.01 * (1 - base_factor), changes


def suggest_settings(box_set: BoxSet, config: ModelConfig, target: float = POOR_COVERAGE,
                     max_boxes: int = 20000, seed: int = 0):
    """The cheapest change of anchor sizes, scales, aspect ratios or input size whose coverage
    reaches ``target`` (else the one with the highest coverage), or None when nothing gains
    at least 5 points over ``config``. Scored on up to ``max_boxes`` boxes drawn at random."""
    sample = box_set.sample(max_boxes, seed)
    baseline = measure_coverage(sample, config).fg
    scored = []
    for cost, changes in sorted(_candidates(config), key=lambda item: item[0]):
        if changes:
            scored.append((cost, measure_coverage(sample, config.replace(**changes)).fg, changes))
    if not scored:
        return None
    reaching = [item for item in scored if item[1] >= target]
    cost, coverage, changes = reaching[0] if reaching else max(scored, key=lambda item: (item[1], -item[0]))
    if coverage < baseline + 0.05:
        return None
    if sample is not box_set:
        coverage = measure_coverage(box_set, config.replace(**changes)).fg
    return Suggestion(changes, coverage)


def summary_line(coverage: Coverage, suggestion: Suggestion = None) -> str:
    """One line for the training log: overall coverage, the worst-covered size range, the suggestion."""
    line = (f"anchor coverage: {coverage.fg:.1%} of {len(coverage.best_iou)} boxes have an anchor with IoU >= "
            f"{coverage.fg_iou_thresh:g} ({coverage.share(0.4):.1%} >= 0.4) at the training resolution")
    populated = [row for row in coverage.by_size() if row[2] >= max(10, 0.01 * len(coverage.best_iou))]
    if populated:
        low, high, count, share, _ = min(populated, key=lambda row: row[3])
        line += f"; lowest: {share:.1%} of the {count} boxes of {_size_range(low, high)}"
    if suggestion is not None:
        line += f"; try {' '.join(suggestion.flags())} ({suggestion.coverage:.1%}), see tools/check_dataset.py"
    return line


def coverage_summary(dataset, config: ModelConfig, max_images: int = 2000, seed: int = 0) -> str:
    """:func:`summary_line` for a dataset with ``box_arrays()``, on at most ``max_images`` of its
    images (a seeded random sample; the suggestion search on at most 5000 boxes): about a second."""
    box_set = BoxSet.from_dataset(dataset, max_images, seed)
    if len(box_set.boxes) == 0:
        return "anchor coverage: no boxes to check"
    coverage = measure_coverage(box_set, config)
    suggestion = suggest_settings(box_set, config, max_boxes=5000, seed=seed) if coverage.fg < POOR_COVERAGE else None
    sampled = f" (a sample of {max_images} images)" if len(dataset) > max_images else ""
    return summary_line(coverage, suggestion) + sampled


def _size_range(low, high) -> str:
    return f">= {low} px" if math.isinf(high) else f"< {high} px" if low == 0 else f"{low}-{high} px"
