"""Crop training: N x N windows of large images at their own resolution (or scaled), as training samples.

A large image (an orthophoto, a slide, a scanned page) cannot be resized whole to a size a
network trains on without shrinking its small objects away, and feeding it whole costs one
step per image. :class:`CropDataset` instead serves random ``crop_size`` x ``crop_size``
windows of the image scaled by ``crop_scale``: it cuts the region of ``round(crop_size /
scale)`` original pixels and resizes only that region (a 6-megapixel image is never resized
whole), the same windows tiled inference feeds the model (``ModelConfig.crop_size`` /
``crop_scale``).

Boxes (``FloatTensor[N, 4]`` absolute x1, y1, x2, y2) are clipped to the window; a box that
keeps at least ``min_visible`` of its area inside stays a box (clipped), one that keeps less
but more than nothing becomes an ignored region (``crowd_boxes``: the loss neither rewards
nor punishes anchors on a half-visible object), never a negative. Crowd boxes are clipped too.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils.data.image_cache import DecodedImageCache

MIN_CROP_SIZE = 32  # one cell of P5 (stride 32): a smaller window has no feature map past P4
# A batch of eight 4096 px windows already needs tens of GB of activations; past that, crop
# training saves nothing over whole images.
MAX_CROP_SIZE = 4096


@dataclass(frozen=True)
class CropSettings:
    """How :class:`CropDataset` cuts its windows.

    size: the window's side N in pixels after scaling; scale: factor the image is scaled by
    (1.0 = native resolution); min_visible: share of a box's area that must lie inside the
    window for it to stay a box (else it is ignored); object_prob: probability of placing the
    window on an object (see :meth:`CropDataset.place_window`); scale_jitter: ``(low, high)``,
    each window's scale multiplied by a factor drawn log-uniformly from it, or None; fill: RGB
    uint8 colour of the padding of windows that reach past a small image (the model's mean
    colour, :func:`mean_fill`, so that padding is 0 after normalisation like the batch padding).
    """
    size: int
    scale: float = 1.0
    min_visible: float = 0.5
    object_prob: float = 0.5
    scale_jitter: Optional[tuple] = None
    fill: tuple = (0, 0, 0)

    def __post_init__(self):
        if not MIN_CROP_SIZE <= self.size <= MAX_CROP_SIZE:
            raise ValueError(f"crop size must be in [{MIN_CROP_SIZE}, {MAX_CROP_SIZE}], got {self.size}")
        if not self.scale > 0:
            raise ValueError(f"crop scale must be > 0, got {self.scale}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if not 0 <= self.object_prob <= 1:
            raise ValueError(f"object_prob must be in [0, 1], got {self.object_prob}")
        if self.scale_jitter is not None and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ValueError(f"scale_jitter must be (low, high) with 0 < low <= high, got {self.scale_jitter}")


def mean_fill(image_mean) -> tuple:
    """The uint8 RGB colour that normalises to (about) 0 with ``image_mean`` (floats in [0, 1])."""
    return tuple(int(round(255 * m)) for m in image_mean)


def windows_per_image(height: float, width: float, size: int, scale: float) -> int:
    """``ceil(h * scale / size) * ceil(w * scale / size)``: the windows that tile the scaled image,
    so one epoch sees about as many pixels as the images hold."""
    # The 1e-9 keeps an exact multiple (2000 px at 0.512 / 256) from rounding up to one more window.
    rows = max(1, math.ceil(height * scale / size - 1e-9))
    cols = max(1, math.ceil(width * scale / size - 1e-9))
    return rows * cols


def clip_boxes_to_window(boxes: torch.Tensor, window: tuple, min_visible: float):
    """Split ``boxes`` ``[N, 4]`` by how much of them ``window`` ``(x1, y1, x2, y2)`` shows.

    Returns ``(clipped, kept, ignored)``: ``clipped`` ``[N, 4]`` every box cut to the window in
    the window's coordinates (origin at its top-left corner); ``kept`` ``bool[N]`` the boxes with
    at least ``min_visible`` of their area inside; ``ignored`` ``bool[N]`` those with less but a
    non-empty part inside. A box with no area (never in a parsed dataset) is neither.
    """
    left, top, right, bottom = window
    x1, y1, x2, y2 = boxes.unbind(-1)
    cx1, cy1 = x1.clamp(left, right), y1.clamp(top, bottom)
    cx2, cy2 = x2.clamp(left, right), y2.clamp(top, bottom)
    visible = (cx2 - cx1) * (cy2 - cy1)
    area = (x2 - x1) * (y2 - y1)
    inside = (visible > 0) & (area > 0)
    # Compare areas, not their ratio: visible >= min_visible * area is exact at the boundary.
    kept = inside & (visible >= min_visible * area)
    clipped = torch.stack([cx1 - left, cy1 - top, cx2 - left, cy2 - top], dim=-1)
    return clipped, kept, inside & ~kept


def crop_window(image: torch.Tensor, target: dict, *, left: int, top: int, region: int, size: int,
                min_visible: float):
    """Cut the ``region`` x ``region`` square at ``(left, top)`` of ``image`` and resize it to ``size``.

    Args:
        image: ``ByteTensor[3, H, W]``; the region is cut where it lies inside the image (a region
            reaching past the image is cut short, not padded: :func:`pad_window` does that).
        target: ``boxes`` / ``crowd_boxes`` ``FloatTensor[., 4]`` and ``labels`` in image pixels.
        left, top: integer corner of the region in image pixels; region: its side in image pixels
            (``round(size / scale)``); size: the side a whole region is resized to.

    Returns ``(window, target)``: ``window`` ``ByteTensor[3, h, w]`` with ``h, w <= size`` (equal
    to ``size`` when the region lies inside the image), bilinearly resized (``align_corners=False``,
    as the model resizes its inputs) unless ``region == size``; boxes clipped and scaled by exactly
    the factors the pixels were (``out / in`` per axis); boxes showing less than ``min_visible``
    move to ``crowd_boxes``. ``window`` in the target is ``(x1, y1, x2, y2)`` of the cut in image
    pixels, ``orig_size`` the window's ``(h, w)``.
    """
    height, width = image.shape[-2:]
    right, bottom = min(left + region, width), min(top + region, height)
    cut = image[:, top:bottom, left:right]
    in_h, in_w = bottom - top, right - left
    out_h = size if in_h == region else max(1, min(size, round(in_h * size / region)))
    out_w = size if in_w == region else max(1, min(size, round(in_w * size / region)))
    if (out_h, out_w) != (in_h, in_w):
        resized = F.interpolate(cut[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False)[0]
        cut = resized.round_().clamp_(0, 255).to(torch.uint8)
    factors = torch.tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h], dtype=torch.float32)
    bounds = (left, top, right, bottom)

    clipped, kept, ignored = clip_boxes_to_window(target["boxes"], bounds, min_visible)
    crowd = target.get("crowd_boxes", torch.zeros(0, 4))
    crowd_clipped, crowd_kept, crowd_partial = clip_boxes_to_window(crowd, bounds, min_visible)
    crowd_boxes = torch.cat([clipped[ignored], crowd_clipped[crowd_kept | crowd_partial]])
    target = {**target, "boxes": clipped[kept] * factors, "labels": target["labels"][kept],
              "crowd_boxes": crowd_boxes * factors, "window": bounds, "orig_size": (out_h, out_w)}
    # A copy even when nothing was resized: the image may be a cached decode other windows still read.
    return cut.clone(memory_format=torch.contiguous_format), target


def pad_window(image: torch.Tensor, size: int, fill: tuple) -> torch.Tensor:
    """``ByteTensor[3, h, w]`` -> ``[3, size, size]``, padded bottom and right with the RGB ``fill``
    (boxes keep their coordinates); an image already ``size`` x ``size`` is returned as is."""
    height, width = image.shape[-2:]
    if (height, width) == (size, size):
        return image
    padded = torch.tensor(fill, dtype=torch.uint8).view(3, 1, 1).repeat(1, size, size)
    padded[:, :height, :width] = image
    return padded


class CropDataset(Dataset):
    """Random ``settings.size`` square windows of the images of ``dataset``, as training samples.

    Args:
        dataset: a ``coco_dataset.CocoDetection`` (without transforms): ``dataset[i]`` is
            ``(ByteTensor[3, H, W], target)``; ``box_arrays()["image_sizes"]`` gives every
            image's ``(H, W)`` without decoding.
        settings: :class:`CropSettings`.
        transforms: ``(image, target) -> (image, target)`` applied to each window before it is
            padded (flips, rotations, colour: the padding stays bottom/right and mean-coloured).
        cache_bytes: decoded images kept between windows (``DecodedImageCache``), per process;
            0 decodes the image again for every window.

    Epochs are counted in windows: image ``i`` owns ``windows_per_image(H_i, W_i, size, scale)``
    consecutive indices, and index ``(i, k)`` is a fresh random window of image ``i`` (``k``
    only makes a large image come up as often as it has windows). All randomness comes from
    torch's RNG, which ``utils.data.loaders.SeededDataset`` seeds per (seed, epoch, index),
    so a window is a function of those three and a resumed run sees the same windows.

    ``dataset[index]`` is ``(ByteTensor[3, size, size], target)`` with ``target`` as in
    :func:`crop_window` (boxes in window pixels).
    """

    def __init__(self, dataset, settings: CropSettings, transforms=None, cache_bytes: int = 0):
        self.dataset, self.settings, self.transforms = dataset, settings, transforms
        self.cache = DecodedImageCache(cache_bytes)
        self.image_sizes = np.asarray(dataset.box_arrays()["image_sizes"], dtype=np.float64)  # [I, 2] (H, W)
        counts = [windows_per_image(h, w, settings.size, settings.scale) for h, w in self.image_sizes]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # image i: [starts[i], starts[i+1])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple:
        """Dataset index -> ``(image index, k)``: the k-th window of that image."""
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range for {len(self)} windows")
        image_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        return image_index, int(index - self._starts[image_index])

    def __getitem__(self, index: int):
        image_index, _ = self.locate(index)
        image, target = self.cache.get(image_index, lambda: self.dataset[image_index])
        settings = self.settings
        region = max(1, round(settings.size / (settings.scale * self._jitter())))
        left, top = self.place_window(target["boxes"], image.shape[-2], image.shape[-1], region)
        window, target = crop_window(image, target, left=left, top=top, region=region, size=settings.size,
                                     min_visible=settings.min_visible)
        if self.transforms is not None:
            window, target = self.transforms(window, target)
        return pad_window(window, settings.size, settings.fill), target

    def _jitter(self) -> float:
        if self.settings.scale_jitter is None:
            return 1.0
        low, high = self.settings.scale_jitter
        return math.exp(math.log(low) + torch.rand(()).item() * (math.log(high) - math.log(low)))

    def place_window(self, boxes: torch.Tensor, height: int, width: int, region: int) -> tuple:
        """Top-left ``(left, top)`` of a ``region`` square on an image ``height`` x ``width``.

        The rule: with probability ``object_prob`` pick one of the image's boxes uniformly and
        place the window uniformly among the integer positions whose window contains that box's
        centre; otherwise (and always for an image without boxes) uniformly among all integer
        positions. Windows stay inside the image along each side longer than ``region``; along a
        shorter side they start at 0 (the window is padded there). So windows favour objects,
        but half of them (by default) still show whatever background the image has.
        """
        x_range, y_range = (0, max(0, width - region)), (0, max(0, height - region))
        if len(boxes) and self.settings.object_prob > 0 and torch.rand(()).item() < self.settings.object_prob:
            x1, y1, x2, y2 = boxes[int(torch.randint(len(boxes), ()))].tolist()
            x_range = _positions_containing((x1 + x2) / 2, region, x_range)
            y_range = _positions_containing((y1 + y2) / 2, region, y_range)
        return _uniform_int(*x_range), _uniform_int(*y_range)

    def aspect_ratios(self) -> list:
        """Every window is square (1.0): one aspect-ratio group."""
        return [1.0] * len(self)

    def box_arrays(self) -> dict:
        """The underlying images' boxes (``CocoDetection.box_arrays``, whole images, image pixels)."""
        return self.dataset.box_arrays()

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def categories(self) -> list:
        return self.dataset.categories

    @property
    def cat_ids(self) -> list:
        return self.dataset.cat_ids

    @property
    def num_images(self) -> int:
        return len(self.dataset)


def _positions_containing(centre: float, region: int, allowed: tuple) -> tuple:
    """Integer starts ``s`` in ``allowed`` with ``s <= centre < s + region``."""
    low, high = allowed
    first = max(low, math.floor(centre - region) + 1)
    last = min(high, math.floor(centre))
    return (first, last) if first <= last else (min(max(first, low), high),) * 2


def _uniform_int(low: int, high: int) -> int:
    return low if high <= low else int(torch.randint(low, high + 1, ()))
