"""Whether a dataset should be trained on crops at native resolution, and with which flags.

Large images with small objects (aerial surveys, slides, scans) resized whole to a size a
GPU affords put their objects under P3's 8 px stride, where no anchor fits them
(``model.anchor_coverage``). Cut into N x N windows of the image at its own resolution, or
scaled by S, the objects keep their size and the anchors fit again (``ModelConfig.crop_size``
and ``crop_scale``; a model trained so tiles its inference by default).

The rule, shared by ``tools/check_dataset.py`` and train.py's log: crops are advised when
the model trains on whole images, its coverage is poor (< ``POOR_COVERAGE``), because the
objects fall under P3's stride at every affordable whole-image size (more than
``1 - POOR_COVERAGE`` of the boxes under twice the stride, 16 px, even at the larger of the
recipe's size and the longer side at ``AFFORDABLE_SIDE``, the paper's largest training
size), the coverage stays poor at those sizes with the anchors as given, halved or
quartered, and crops gain at least 5 points over the best of those. Small images with poor
coverage for other reasons (the demo's shapes) get the whole-image suggestion instead.

The crop settings tried: ``crop_scale`` in ``CROP_SCALES`` with the anchors as given, halved
or quartered; each costs S^2 (the windows per image grow with the scaled area), smaller
anchors nothing; the cheapest reaching the target wins, else the best. The window holds the
objects twice over: the smallest multiple of the coarsest stride (or of ``size_divisible``)
of at least ``MIN_WINDOW`` px and twice the 99th percentile of the scaled boxes' longer
sides, at most ``MAX_WINDOW`` px (more context costs memory, not coverage).

Memory per training step is a rough model, not a measurement: a fixed part (R-50 weights,
gradients and SGD momentum in fp32, about 0.4 GiB) plus activations proportional to the
padded input pixels times the batch, calibrated on the one figure measured on a GPU
(docs/performance.md: R-50, 800 x 1333 padded to 896 x 1408, batch 16, AMP fp16, training
peak 10768 MiB). fp32 about doubles the activations, a smaller trunk (resnet18) or a frozen
one needs less: take it as the order of magnitude, not the figure.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from model.anchor_coverage import FIRST_LEVEL, POOR_COVERAGE, BoxSet, measure_coverage, training_image_sizes
from model.config import ModelConfig

AFFORDABLE_SIDE = 1333           # longer side of the largest whole-image size the paper trains at
CROP_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
ANCHOR_FACTORS = (1.0, 0.5, 0.25)
MIN_WINDOW, MAX_WINDOW = 256, 1024
MIN_GAIN = 0.05                  # crops must beat the best affordable whole-image coverage by this much
_MEASURED_MIB = 10768            # docs/performance.md, H200: R-50, batch 16, AMP fp16, training peak
_MEASURED_PIXELS = 16 * 896 * 1408
_FIXED_MIB = 400                 # ~34 M parameters x (weight, gradient, momentum) x 4 bytes


def step_memory_gib(padded_height: int, padded_width: int, batch_size: int) -> float:
    """Rough GPU memory of one training step (see the module docstring for the model)."""
    per_pixel = (_MEASURED_MIB - _FIXED_MIB) / _MEASURED_PIXELS
    return (_FIXED_MIB + per_pixel * padded_height * padded_width * batch_size) / 1024


def _padded(side: float, config: ModelConfig) -> int:
    return math.ceil(side / config.size_divisible) * config.size_divisible


def _anchor_variants(config: ModelConfig):
    """``(factor, anchor_base_sizes)``: as given, halved, quartered."""
    for factor in ANCHOR_FACTORS:
        yield factor, tuple(max(1, round(b * factor)) for b in config.anchor_base_sizes)


def _affordable(config: ModelConfig):
    """The affordable whole-image sizes: the recipe's, and longer side ``AFFORDABLE_SIDE``."""
    whole = config.replace(crop_size=0)
    return whole, whole.replace(min_size=AFFORDABLE_SIDE, max_size=AFFORDABLE_SIDE, fixed_size=None)


def tiny_share(box_set: BoxSet, config: ModelConfig) -> float:
    """Share of the boxes under twice P3's stride (sqrt(area) < 16 px) at the largest
    affordable whole-image size of their image."""
    scales = [(training_image_sizes(box_set.image_sizes, sized) / box_set.image_sizes).min(dim=1).values
              for sized in _affordable(config)]                                                  # 2 x [I]
    boxes = box_set.boxes.double()
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    size = area.sqrt() * torch.maximum(*scales)[box_set.image_index]                            # [G]
    return float((size < 2 * 2 ** FIRST_LEVEL).double().mean()) if len(size) else 0.0


def affordable_whole_image_coverage(box_set: BoxSet, config: ModelConfig) -> float:
    """Best coverage over the affordable whole-image sizes (the recipe's, longer side
    ``AFFORDABLE_SIDE``) and the anchors as given, halved or quartered."""
    return max(measure_coverage(box_set, sized.replace(anchor_base_sizes=anchors)).fg
               for sized in _affordable(config) for _, anchors in _anchor_variants(config))


def window_size(box_set: BoxSet, config: ModelConfig, crop_scale: float) -> int:
    """The crop window N for ``crop_scale``: see the module docstring."""
    num_levels = 3 + config.num_extra_levels
    multiple = max(config.size_divisible, 2 ** (FIRST_LEVEL + num_levels - 1))
    boxes = box_set.boxes
    sides = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * crop_scale   # [G]
    largest = float(torch.quantile(sides, 0.99)) if len(sides) else 0.0
    image_side = float(box_set.image_sizes.max()) * crop_scale if len(box_set.image_sizes) else MIN_WINDOW
    window = min(max(MIN_WINDOW, 2 * largest), MAX_WINDOW, image_side)
    return max(multiple, math.ceil(window / multiple) * multiple)


@dataclass(frozen=True)
class CropSuggestion:
    """Crop training settings and what they give: coverage against the whole-image figures."""
    crop_size: int
    crop_scale: float
    anchor_base_sizes: Optional[tuple]   # None: the model's own
    coverage: float                      # share of boxes >= fg_iou_thresh on crops
    whole_image_coverage: float          # the model's own whole-image coverage
    affordable_coverage: float           # best at an affordable whole-image size
    tiny_share: float                    # share of boxes under 16 px at the largest affordable size
    batch_size: int
    memory_gib: float                    # rough, per training step of batch_size windows
    whole_image_memory_gib: float        # same, for a median image at longer side AFFORDABLE_SIDE

    @property
    def tile_window(self) -> int:
        """The inference window in original pixels: round(N / S)."""
        return round(self.crop_size / self.crop_scale)

    def flags(self) -> list:
        flags = ["--crop-size", str(self.crop_size), "--crop-scale", f"{self.crop_scale:g}"]
        if self.anchor_base_sizes is not None:
            flags += ["--anchor-base-sizes", *map(str, self.anchor_base_sizes)]
        return flags

    def changes(self) -> dict:
        """The ModelConfig fields train.py sets from :meth:`flags`."""
        changes = {"crop_size": self.crop_size, "crop_scale": self.crop_scale,
                   "min_size": self.crop_size, "max_size": self.crop_size}
        if self.anchor_base_sizes is not None:
            changes["anchor_base_sizes"] = self.anchor_base_sizes
        return changes

    def line(self) -> str:
        """The one-line advice (train.py's log, the end of check_dataset's report)."""
        return (f"small objects in large images: anchor coverage {self.whole_image_coverage:.1%} on whole images, "
                f"at most {self.affordable_coverage:.1%} at any affordable whole-image size ({self.tiny_share:.0%} of "
                f"the boxes under {2 * 2 ** FIRST_LEVEL} px even at longer side {AFFORDABLE_SIDE}); crops reach "
                f"{self.coverage:.1%}: train with {' '.join(self.flags())} "
                f"(about {self.memory_gib:.1f} GiB per step of {self.batch_size} windows, a rough R-50 fp16 "
                f"estimate), and inference then tiles by default in {self.tile_window} px windows "
                f"(tools/check_dataset.py for details)")


def suggest_crops(box_set: BoxSet, config: ModelConfig, batch_size: int, target: float = POOR_COVERAGE,
                  max_boxes: int = 20000, seed: int = 0) -> Optional[CropSuggestion]:
    """Crop settings for ``box_set`` when the module's rule advises crops, else None.
    Scored on up to ``max_boxes`` boxes drawn at random; the coverage returned is on all."""
    if config.crop_size or len(box_set.boxes) == 0:
        return None
    sample = box_set.sample(max_boxes, seed)
    whole = measure_coverage(sample, config).fg
    tiny = tiny_share(sample, config)
    if whole >= target or tiny <= 1 - target:
        return None
    affordable = max(whole, affordable_whole_image_coverage(sample, config))
    if affordable >= target:
        return None
    scored = []
    for scale in CROP_SCALES:
        window = window_size(sample, config, scale)
        for factor, anchors in _anchor_variants(config):
            changes = {"crop_size": window, "crop_scale": scale, "min_size": window, "max_size": window}
            if factor != 1:
                changes["anchor_base_sizes"] = anchors
            coverage = measure_coverage(sample, config.replace(**changes)).fg
            scored.append((scale * scale + 0.01 * (1 - factor), coverage, changes))
    scored.sort(key=lambda item: item[0])
    reaching = [item for item in scored if item[1] >= target]
    _, coverage, changes = reaching[0] if reaching else max(scored, key=lambda item: (item[1], -item[0]))
    if coverage < affordable + MIN_GAIN:
        return None
    if sample is not box_set:
        whole = measure_coverage(box_set, config).fg
        coverage = measure_coverage(box_set, config.replace(**changes)).fg
        tiny = tiny_share(box_set, config)
    window = changes["crop_size"]
    padded_window = _padded(window, config)
    median = box_set.image_sizes.median(dim=0).values                                    # (height, width)
    whole_sides = [_padded(float(side) * AFFORDABLE_SIDE / float(median.max()), config) for side in median]
    return CropSuggestion(crop_size=window, crop_scale=changes["crop_scale"],
                          anchor_base_sizes=changes.get("anchor_base_sizes"), coverage=coverage,
                          whole_image_coverage=whole, affordable_coverage=affordable, tiny_share=tiny,
                          batch_size=batch_size,
                          memory_gib=step_memory_gib(padded_window, padded_window, batch_size),
                          whole_image_memory_gib=step_memory_gib(*whole_sides, batch_size))


def crop_advice(box_arrays: dict, config: ModelConfig, batch_size: int, max_images: int = 2000,
                seed: int = 0) -> Optional[str]:
    """The one-line advice for train.py's log when crops are advised (``CocoDetection.box_arrays()``
    of the training set), else None. On at most ``max_images`` images and 5000 boxes: well under
    a second."""
    box_set = BoxSet.from_arrays(box_arrays, max_images, seed)
    suggestion = suggest_crops(box_set, config, batch_size, max_boxes=5000, seed=seed)
    return None if suggestion is None else suggestion.line()
