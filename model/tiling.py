"""Sliced inference: a detector run over overlapping windows of a large image, the detections merged.

A model trained on crops (``ModelConfig.crop_size`` N > 0, images scaled by ``crop_scale`` s)
has seen objects at scale s in N x N windows; shrinking a 6000 px image into its N px input
would shrink a 40 px object to nothing. :class:`TiledDetector` cuts windows of
``round(N / s)`` px of the original image (the model resizes each to N x N, so it sees them
at exactly its training scale), runs them through the model a batch at a time, shifts the
boxes back and merges the duplicates along the seams (``model/tile_merge.py``: the rule for
objects cut by a window edge and its limit, the merge methods).

Windows (:func:`tile_positions`): the stride is ``round(tile * (1 - overlap))``; the last
row and column are flush with the image's bottom and right border, so every pixel is
covered and no window hangs over the border. An image narrower or shorter than the tile
gets one window along that axis, padded bottom / right with the model's mean colour (the
value its batches are padded with after normalisation), never stretched. Windows are cut
from the uint8 image as views; only a window (never a whole 10000 x 10000 image) becomes
float, inside the model.

    detector = tile_detector(model)                       # the model's default: tiled if crop-trained
    detector = TiledDetector(model, tile=512, overlap=0.25, merge="greedy", whole_image=True)
    outputs = detector([image])                           # [{"boxes", "scores", "labels"}], as model(images)
"""
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.tile_merge import (DEFAULT_MERGE, EDGE_MARGIN, GREEDY_MATCH_THRESH, MERGE_METHODS, concatenate,
                              merge_detections, select, split_window_detections, touching)
from model.transform import IMAGENET_MEAN
from utils.runtime.errors import ConfigError

DEFAULT_OVERLAP = 0.25      # share of a window its neighbour also covers
MIN_TILE = 32               # smaller windows hold less than one P5 cell
DEFAULT_TILE_BATCH = 8      # windows per model call
PROGRESS_MIN_WINDOWS = 64   # a progress bar for calls with at least this many windows


def tile_stride(tile: int, overlap: float) -> int:
    """Pixels between neighbouring window origins: ``tile * (1 - overlap)`` rounded (half up)."""
    return int(math.floor(tile * (1 - overlap) + 0.5))


def axis_positions(length: int, tile: int, stride: int) -> list:
    """Window origins along an axis of ``length`` px: ``0, stride, 2 * stride, ...`` and a last one
    flush with the end (``length - tile``); ``[0]`` when one window covers the axis."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def tile_positions(height: int, width: int, tile: int, overlap: float) -> list:
    """Origins ``(top, left)`` of the ``tile x tile`` windows of a ``height x width`` image, row by row."""
    check_tile(tile, overlap)
    stride = tile_stride(tile, overlap)
    return [(top, left) for top in axis_positions(height, tile, stride) for left in axis_positions(width, tile, stride)]


def check_tile(tile: int, overlap: float) -> None:
    """ConfigError (one line) unless ``tile >= MIN_TILE``, ``0 <= overlap < 1`` and the stride is >= 1 px."""
    if not 0 <= overlap < 1:
        raise ConfigError(f"--tile-overlap must lie in [0, 1), got {overlap}")
    if tile < MIN_TILE:
        raise ConfigError(f"--tile {tile}: windows must be at least {MIN_TILE} px (0 turns tiling off)")
    if tile_stride(tile, overlap) < 1:
        raise ConfigError(f"--tile {tile} with --tile-overlap {overlap} leaves a stride under 1 px; "
                          f"lower the overlap")


@dataclass(frozen=True)
class TileOptions:
    """What the user asked for (inference.py / evaluation.py flags); None fields: the defaults.

    tile: window side in original pixels; None = the model's own (``round(crop_size / crop_scale)``
        for a crop-trained model, else no tiling); 0 = no tiling.
    overlap (``DEFAULT_OVERLAP``), merge (``"nms"`` or ``"greedy"``, ``DEFAULT_MERGE``),
    whole_image: also run the model on the whole image and merge its detections in,
    batch: windows per model call, max_detections: cap on the merged result (None: the
    model's ``detections_per_img``).
    """
    tile: Optional[int] = None
    overlap: Optional[float] = None
    merge: Optional[str] = None
    whole_image: bool = False
    batch: int = DEFAULT_TILE_BATCH
    max_detections: Optional[int] = None

    def __post_init__(self):
        if self.tile is not None and self.tile < 0:
            raise ConfigError(f"--tile must be >= 0 (0 = no tiling), got {self.tile}")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise ConfigError(f"--tile-overlap must lie in [0, 1), got {self.overlap}")
        if self.tile:
            check_tile(self.tile, DEFAULT_OVERLAP if self.overlap is None else self.overlap)
        if self.merge is not None and self.merge not in MERGE_METHODS:
            raise ConfigError(f"--tile-merge must be one of {', '.join(MERGE_METHODS)}, got {self.merge!r}")
        if self.batch < 1 or (self.max_detections is not None and self.max_detections < 1):
            raise ConfigError("--tile-batch and --tile-max-detections must be >= 1")

    def tiling_flags(self) -> list:
        """The flags given that only mean something with tiling on."""
        given = {"--tile-overlap": self.overlap is not None, "--tile-merge": self.merge is not None,
                 "--tile-whole-image": self.whole_image, "--tile-max-detections": self.max_detections is not None}
        return [flag for flag, on in given.items() if on]


def model_config_of(model) -> dict:
    """The ``ModelConfig`` fields of an eager RetinaNet (``.config``) or an ONNX export (its metadata) as a
    dict; ``{}`` for a model that carries none (then: no crop training, ImageNet mean)."""
    return dict(getattr(model, "config", None) or {})


def default_tile(config: dict) -> int:
    """The window a model tiles with by default: ``round(crop_size / crop_scale)`` px, 0 for whole-image models."""
    crop_size = int(config.get("crop_size") or 0)
    if crop_size <= 0:
        return 0
    return int(math.floor(crop_size / float(config.get("crop_scale") or 1.0) + 0.5))


def resolve_tile(model, options: TileOptions) -> int:
    """The window side ``model`` runs with under ``options`` (0: no tiling), or a one-line ConfigError
    for a combination that cannot work."""
    config = model_config_of(model)
    tile = default_tile(config) if options.tile is None else options.tile
    if tile == 0:
        flags = options.tiling_flags()
        if flags:
            why = "--tile 0" if options.tile == 0 else "the model was trained on whole images (no crop_size)"
            raise ConfigError(f"{' '.join(flags)} needs tiling, which is off ({why}); pass --tile N (window "
                              f"side in pixels of the original image)")
        return 0
    check_tile(tile, DEFAULT_OVERLAP if options.overlap is None else options.overlap)
    fixed_size = config.get("fixed_size")
    if fixed_size and fixed_size[0] != fixed_size[1]:
        raise ConfigError(f"the model resizes every input to {fixed_size[0]} x {fixed_size[1]} (fixed_size), which "
                          f"would stretch square windows: it cannot tile; use --tile 0")
    input_size = getattr(model, "input_size", None)  # an ONNX graph exported for one input size
    if input_size is not None and tuple(input_size) != (tile, tile):
        raise ConfigError(f"the exported graph takes {input_size[0]} x {input_size[1]} inputs only, not windows of "
                          f"{tile} x {tile}: export it without --fixed-size (or --fixed-size {tile} {tile})")
    if input_size is not None and options.whole_image:
        raise ConfigError("--tile-whole-image needs a model that takes any input size, not a --fixed-size export")
    return tile


def tile_detector(model, options: TileOptions = None, *, show_progress: bool = True):
    """``model`` wrapped in a :class:`TiledDetector` as ``options`` (default: the model's own) ask, or
    ``model`` itself when tiling is off."""
    options = options or TileOptions()
    tile = resolve_tile(model, options)
    if tile == 0:
        return model
    return TiledDetector(model, tile=tile, overlap=DEFAULT_OVERLAP if options.overlap is None else options.overlap,
                         merge=options.merge or DEFAULT_MERGE, whole_image=options.whole_image,
                         tile_batch=options.batch, max_detections=options.max_detections,
                         show_progress=show_progress)


def pad_colour(config: dict) -> tuple:
    """The uint8 colour whose normalised value is (about) 0: what the model pads batches with."""
    return tuple(int(round(mean * 255)) for mean in config.get("image_mean") or IMAGENET_MEAN)


def cut_window(image: torch.Tensor, top: int, left: int, tile: int, colour: tuple) -> torch.Tensor:
    """The ``tile x tile`` window of ``image`` ``[3, H, W]`` at ``(top, left)``: a view, or a padded copy
    (bottom / right, ``colour`` in uint8 units) where the image ends first."""
    window = image[:, top:top + tile, left:left + tile]
    if window.shape[1] == tile and window.shape[2] == tile:
        return window
    fill = torch.tensor(colour, dtype=torch.float32).div(1 if image.dtype == torch.uint8 else 255)
    padded = fill.to(image.device, image.dtype).view(3, 1, 1).expand(3, tile, tile).contiguous()
    padded[:, :window.shape[1], :window.shape[2]] = window
    return padded


class TiledDetector:
    """``model`` (eval interface: list of ``[3, H, W]`` uint8 or float images -> ``[{"boxes" FloatTensor[D, 4]
    x1y1x2y2, "scores" [D], "labels" Int64Tensor[D]}]``; an eager RetinaNet or ``deploy.predict.OnnxEvalModel``)
    run on windows, with the same interface. Eval only.

    Args:
        tile: window side in pixels of the input image; overlap: in [0, 1).
        merge: "nms" or "greedy" (``model/tile_merge.py``); merge_iou: IoU of the NMS merge (default:
            the model's ``nms_thresh``); match_thresh: the greedy merge's overlap (of the smaller box).
        whole_image: also run the model on the whole image (shrunk to the model's input size as
            uint8 first) and merge its detections in: large objects, which no window holds.
        tile_batch: windows per model call (across the images of a call).
        score_thresh: drop merged detections scoring below (None: keep what the model outputs).
        max_detections: cap per image on the merged result (None: the model's ``detections_per_img``).
        edge_margin: px; a box this close to a window edge counts as cut by it.

    ``last_stats`` holds the windows, model seconds and merge seconds of the latest call.
    """

    training = False

    def __init__(self, model, *, tile: int, overlap: float = DEFAULT_OVERLAP, merge: str = DEFAULT_MERGE,
                 whole_image: bool = False, tile_batch: int = DEFAULT_TILE_BATCH, score_thresh: float = None,
                 max_detections: int = None, merge_iou: float = None, match_thresh: float = GREEDY_MATCH_THRESH,
                 edge_margin: float = EDGE_MARGIN, show_progress: bool = True):
        check_tile(tile, overlap)
        if merge not in MERGE_METHODS:
            raise ConfigError(f"merge must be one of {', '.join(MERGE_METHODS)}, got {merge!r}")
        self.model, self.tile, self.overlap, self.merge = model, int(tile), float(overlap), merge
        self.whole_image, self.tile_batch, self.score_thresh = whole_image, int(tile_batch), score_thresh
        self.config = model_config_of(model)
        self.max_detections = int(max_detections or getattr(model, "detections_per_img", None)
                                  or self.config.get("detections_per_img", 100))
        self.merge_iou = float(merge_iou if merge_iou is not None else
                               getattr(model, "nms_thresh", self.config.get("nms_thresh", 0.5)))
        self.match_thresh, self.edge_margin, self.show_progress = match_thresh, edge_margin, show_progress
        self.colour = pad_colour(self.config)
        self.last_stats = {}

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError("a TiledDetector only predicts; train the model it wraps")
        return self

    def describe(self) -> str:
        return (f"tiles of {self.tile} px, overlap {self.overlap:g} (stride "
                f"{tile_stride(self.tile, self.overlap)} px), merge {self.merge}"
                f"{' + whole-image pass' if self.whole_image else ''}")

    @torch.no_grad()
    def __call__(self, images: list) -> list:
        stride = tile_stride(self.tile, self.overlap)
        grids = [(axis_positions(image.shape[1], self.tile, stride), axis_positions(image.shape[2], self.tile, stride))
                 for image in images]
        jobs = [(index, top, left) for index, (ys, xs) in enumerate(grids) for top in ys for left in xs]
        found = [[] for _ in images]
        start = time.perf_counter()
        with tqdm(total=len(jobs), unit="window", desc="tiles", leave=False, dynamic_ncols=True,
                  disable=not self.show_progress or len(jobs) < PROGRESS_MIN_WINDOWS) as progress:
            for first in range(0, len(jobs), self.tile_batch):
                batch = jobs[first:first + self.tile_batch]
                outputs = self.model([cut_window(images[i], top, left, self.tile, self.colour)
                                      for i, top, left in batch])
                for (i, top, left), output in zip(batch, outputs):
                    found[i].append(shift(output, top=top, left=left, height=images[i].shape[1],
                                          width=images[i].shape[2]))
                progress.update(len(batch))
        model_seconds = time.perf_counter() - start
        results = []
        for image, (ys, xs), windows in zip(images, grids, found):
            whole = self._whole_image_pass(image) if self.whole_image else None
            results.append(self._merge(windows, ys, xs, image.shape[1], image.shape[2], whole))
        self.last_stats = {"windows": len(jobs), "model_seconds": model_seconds,
                           "merge_seconds": time.perf_counter() - start - model_seconds}
        return results

    def _merge(self, windows: list, ys: list, xs: list, height: int, width: int, whole) -> dict:
        private, shared = split_window_detections(windows, ys, xs, tile=self.tile, height=height, width=width,
                                                  edge_margin=self.edge_margin)
        if whole is not None:  # a private detection may overlap a whole-image one: it joins the merge
            near = touching(private["boxes"], whole["boxes"])
            shared = concatenate([shared, select(private, near), whole])
            private = select(private, ~near)
        merged = merge_detections(shared, method=self.merge, iou_thresh=self.merge_iou, match_thresh=self.match_thresh,
                                  cell_limit=self.tile)
        result = concatenate([private, merged])
        if self.score_thresh is not None:
            result = select(result, result["scores"] >= self.score_thresh)
        # Stable: a single window's detections keep the model's own order (equal scores included).
        order = result["scores"].argsort(descending=True, stable=True)[:self.max_detections]
        return select(result, order)

    def _whole_image_pass(self, image: torch.Tensor) -> dict:
        """The model on the whole image, shrunk first (as uint8) to the size the model would resize it to."""
        height, width = image.shape[1:]
        size = model_input_size(self.config, height, width)
        if size is None or size[0] * size[1] >= height * width:
            output = self.model([image])[0]
            return shift(output, top=0, left=0, height=height, width=width)
        small = shrink(image, size)
        output = shift(self.model([small])[0], top=0, left=0, height=size[0], width=size[1])
        output["boxes"][:, 0::2] *= width / size[1]
        output["boxes"][:, 1::2] *= height / size[0]
        return output


def shift(output: dict, *, top: int, left: int, height: int, width: int) -> dict:
    """A window's detections moved to the image's pixels (float32) and clipped to its ``height x width``."""
    boxes = output["boxes"].float().clone()
    boxes[:, 0::2] = (boxes[:, 0::2] + left).clamp_(0, width)
    boxes[:, 1::2] = (boxes[:, 1::2] + top).clamp_(0, height)
    return {"boxes": boxes, "scores": output["scores"].float(), "labels": output["labels"]}


def model_input_size(config: dict, height: int, width: int):
    """``(h, w)`` the model resizes a ``height x width`` image to in eval mode, None if its config does not say."""
    if config.get("fixed_size"):
        return tuple(int(s) for s in config["fixed_size"])
    if not config.get("min_size") or not config.get("max_size"):
        return None
    min_size = config["min_size"][-1] if isinstance(config["min_size"], (list, tuple)) else config["min_size"]
    scale = min(min_size / min(height, width), config["max_size"] / max(height, width))
    return max(1, int(math.floor(height * scale))), max(1, int(math.floor(width * scale)))


def shrink(image: torch.Tensor, size: tuple) -> torch.Tensor:
    """``image`` resized to ``size`` bilinearly, keeping its dtype; uint8 on the CPU without a float copy."""
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    small = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return small.round().clamp(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else small
