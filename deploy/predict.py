"""Running a detector over image files and videos, and writing what it finds (inference.py's work).

The detector is an eager :class:`model.retinanet.RetinaNet` in eval mode, an
:class:`deploy.ort_detector.OnnxDetector`, or either (the ONNX one as :class:`OnnxEvalModel`)
run window by window by :class:`model.tiling.TiledDetector`; :func:`predict` gives them
the same call surface. :func:`add_tile_arguments` / :func:`tile_options` are the
sliced-inference flags inference.py and evaluation.py share.
What comes out, per image or detected frame, is the torchvision convention: boxes
``FloatTensor[D, 4]`` absolute ``x1, y1, x2, y2`` in the image's own pixels, ``scores
FloatTensor[D]``, ``labels Int64Tensor[D]`` indexing ``categories`` (``[{"id", "name"}]``,
the model's dataset ids). From it :func:`detect_images` writes drawn copies and the
detections.json records (and COCO results, with the dataset's category ids), and
:func:`detect_videos` a drawn video and per-frame JSON per video (``utils/visual/video.py``).
"""
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from deploy.ort_detector import OnnxDetector
from model.tile_merge import DEFAULT_MERGE, MERGE_METHODS
from model.tiling import DEFAULT_OVERLAP, DEFAULT_TILE_BATCH, TileOptions
from utils.data.inputs import frames_file_name, image_loader, remove_if_empty
from utils.evaluation.coco_results import CocoResultsWriter
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.device import autocast
from utils.runtime.errors import InferenceError
from utils.visual.video import VideoReadError, process_video
from utils.visual.visualize import draw_detections, save_image

logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict(model, images, device: torch.device, amp_dtype=None) -> list:
    """Model outputs on the CPU in float32 for ``images`` (``ByteTensor[3, H, W]`` each), boxes ``[D, 4]``
    x1y1x2y2 in each image's own pixels."""
    if isinstance(model, OnnxDetector):  # one image per ONNX Runtime call, numpy in and out
        return [{key: torch.from_numpy(value) for key, value in model(image.numpy()).items()} for image in images]
    with autocast(device, amp_dtype):
        outputs = model([image.to(device, non_blocking=True) for image in images])
    return [{key: output[key].float().cpu() if key != "labels" else output[key].cpu()
             for key in ("boxes", "scores", "labels")} for output in outputs]


class OnnxEvalModel:
    """An :class:`OnnxDetector` behind the eager model's eval-mode call surface, so that
    ``engine.evaluate`` scores an exported file exactly as it scores a checkpoint: a list of
    ``ByteTensor[3, H, W]`` (on the CPU) in, ``[{"boxes", "scores", "labels"}]`` torch tensors out."""

    training = False

    def __init__(self, detector: OnnxDetector):
        self.detector = detector

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise ValueError(f"{self.detector.path} is an exported model: it cannot train")
        return self

    def __call__(self, images: list) -> list:
        return predict(self.detector, images, torch.device("cpu"))

    # What model/tiling.py reads from a model, from the file's metadata.
    @property
    def config(self) -> dict:
        """The exported model's ``ModelConfig`` fields ({} for a file without them)."""
        return dict(self.detector.metadata.get("model_config") or {})

    @property
    def input_size(self):
        """``(H, W)`` of a --fixed-size export, None when the graph takes any size."""
        return self.detector.fixed_size

    @property
    def nms_thresh(self) -> float:
        return float(self.detector.metadata.get("nms_thresh", self.config.get("nms_thresh", 0.5)))

    @property
    def detections_per_img(self) -> int:
        return int(self.detector.metadata.get("detections_per_img", self.config.get("detections_per_img", 100)))


def add_tile_arguments(parser):
    """inference.py's and evaluation.py's sliced-inference flags (``model/tiling.py``); returns their group."""
    group = parser.add_argument_group("sliced inference (large images; model/tiling.py)")
    group.add_argument("--tile", type=int, metavar="N", help="run the model on overlapping N x N windows (pixels of "
                       "the original image) and merge their detections; None = the model's own: windows of "
                       "crop_size / crop_scale px for a model trained on crops, no tiling otherwise; 0 = no tiling")
    group.add_argument("--tile-overlap", type=float, metavar="F", help="share of a window its neighbour also "
                       f"covers, in [0, 1); None = {DEFAULT_OVERLAP}. Objects up to about F x N px are reported "
                       "whole from one window")
    group.add_argument("--tile-merge", choices=MERGE_METHODS, help="how duplicates across seams merge: nms "
                       "(class-aware NMS at the model's IoU threshold) or greedy (a box absorbs same-class boxes "
                       f"overlapping it, union box, best score); None = {DEFAULT_MERGE}")
    group.add_argument("--tile-whole-image", action="store_true", help="also run the model on the whole image "
                       "and merge its detections in (objects larger than the overlap)")
    group.add_argument("--tile-batch", type=int, default=DEFAULT_TILE_BATCH, metavar="N",
                       help="windows per forward pass")
    return group


def tile_options(args) -> TileOptions:
    """The sliced-inference flags as a :class:`TileOptions` (a bad value: one-line ConfigError)."""
    return TileOptions(tile=args.tile, overlap=args.tile_overlap, merge=args.tile_merge,
                       whole_image=args.tile_whole_image, batch=args.tile_batch,
                       max_detections=getattr(args, "tile_max_detections", None))


def image_record(path, output_name, image, boxes, scores, labels, categories) -> dict:
    """One detections.json entry; boxes ``[D, 4]`` x1y1x2y2 in ``image``'s pixels, labels index ``categories``."""
    # One host copy per tensor, not one per detection.
    detections = [{"box": [round(v, 2) for v in box], "score": round(score, 4),
                   "category_id": categories[label]["id"], "category_name": categories[label]["name"]}
                  for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())]
    return {"file_name": os.path.basename(path), "image_path": path, "width": int(image.shape[2]),
            "height": int(image.shape[1]), "output_file": output_name, "detections": detections}


def detect_images(model, paths, names, categories, output_dir: Path, *, device: torch.device, amp_dtype,
                  score_threshold: float, batch_size: int, workers: int,
                  coco_results: CocoResultsWriter = None) -> dict:
    """Detect on every image of ``paths``; draw those scoring at least ``score_threshold`` into
    ``output_dir / names[i]`` and describe them in a detections.json record; give ``coco_results``
    everything the model outputs. An unreadable file is logged and skipped.

    Returns ``{"records", "num_detections", "num_skipped", "seconds", "model_seconds"}``.
    """
    loader = image_loader(paths, batch_size, workers, pin_memory=device.type == "cuda")
    class_names = [category["name"] for category in categories]
    records, num_detections, num_skipped, model_seconds = [], 0, 0, 0.0
    start = time.perf_counter()
    with logging_redirect_tqdm(), tqdm(total=len(paths), unit="img", desc="inference") as progress:
        for batch in loader:
            for _, _, error in batch:
                if error is not None:
                    logger.warning("skipped: %s", error)
                    num_skipped += 1
            readable = [(index, image) for index, image, error in batch if error is None]
            if readable:
                model_start = time.perf_counter()
                outputs = predict(model, [image for _, image in readable], device, amp_dtype)
                model_seconds += time.perf_counter() - model_start
                for (index, image), output in zip(readable, outputs):
                    if coco_results is not None:
                        coco_results.add(index, output, categories)
                    keep = output["scores"] >= score_threshold
                    boxes, scores, labels = output["boxes"][keep], output["scores"][keep], output["labels"][keep]
                    save_image(draw_detections(image, boxes, labels, scores, class_names), output_dir / names[index])
                    records.append(image_record(paths[index], names[index], image, boxes, scores, labels, categories))
                    num_detections += len(scores)
            progress.update(len(batch))
    return {"records": records, "num_detections": num_detections, "num_skipped": num_skipped,
            "seconds": time.perf_counter() - start, "model_seconds": model_seconds}


def detect_videos(videos, names, model, categories, output_dir: Path, *, device: torch.device, amp_dtype,
                  score_threshold: float, every: int, batch_size: int):
    """Each video: a drawn copy ``output_dir / names[i]`` and its per-frame JSON (utils/visual/video.py),
    detections scoring at least ``score_threshold``. ``(summaries, number not readable)``."""
    class_names = [category["name"] for category in categories]

    def detect(frames):
        outputs = predict(model, frames, device, amp_dtype)
        return [{k: output[k][output["scores"] >= score_threshold] for k in ("boxes", "scores", "labels")}
                for output in outputs]

    def draw(frame, found):
        return draw_detections(frame, found["boxes"], found["labels"], found["scores"], class_names)

    def describe(frame, found):
        return image_record("", "", frame, found["boxes"], found["scores"], found["labels"], categories)["detections"]

    summaries = []
    for path, name in zip(videos, names):
        try:
            summary = process_video(path, output_dir / name, output_dir / frames_file_name(name), detect, draw,
                                    describe, every=every, batch_size=batch_size)
        except VideoReadError as exc:
            logger.warning("skipped: %s", exc)
            continue
        summaries.append(summary)
        logger.info("%s: %d frames (%d detected, %d detections) -> %s, %s", path, summary["num_frames"],
                    summary["num_detected_frames"], summary["num_detections"], output_dir / name,
                    output_dir / summary["frames_file"])
    return summaries, len(videos) - len(summaries)


def finish_videos(summaries, num_skipped: int, output_dir: Path, made_output_dir: bool) -> dict:
    """The summary of a run on videos alone; InferenceError when none could be read."""
    if not summaries:
        if made_output_dir:
            remove_if_empty(output_dir)
        raise InferenceError(f"none of the {num_skipped} input videos could be read (see the warnings above)")
    logger.info("%d videos, %d frames, %d detections (%d skipped) -> %s", len(summaries),
                sum(s["num_frames"] for s in summaries), sum(s["num_detections"] for s in summaries), num_skipped,
                output_dir)
    return {"num_images": 0, "num_detections": sum(s["num_detections"] for s in summaries),
            "num_skipped": num_skipped, "output_dir": str(output_dir), "videos": summaries}


def finish_images(found: dict, video_summaries, num_skipped: int, output_dir: Path, made_output_dir: bool, *,
                  num_images: int, score_threshold: float, coco_results: CocoResultsWriter = None) -> dict:
    """Write detections.json (and the COCO results) of :func:`detect_images`' ``found``; the run's summary.

    InferenceError when none of the ``num_images`` images (and no video) could be read.
    """
    records = found["records"]
    if not records and not video_summaries:
        if made_output_dir:
            remove_if_empty(output_dir)  # leave no empty run folder behind
        raise InferenceError(f"none of the {num_images} input images could be read (see the warnings above)")
    write_json_atomic(output_dir / "detections.json", records)
    if coco_results is not None:
        logger.info("%d detections on %d images in COCO results format -> %s", len(coco_results.results),
                    coco_results.num_images, coco_results.write())
    logger.info("%.1f images/s end to end (model alone %.1f images/s)",
                len(records) / max(found["seconds"], 1e-9), len(records) / max(found["model_seconds"], 1e-9))
    logger.info("%d images, %d detections (score >= %g), %d skipped -> %s",
                len(records), found["num_detections"], score_threshold, num_skipped, output_dir)
    return {"num_images": len(records), "num_detections": found["num_detections"], "num_skipped": num_skipped,
            "output_dir": str(output_dir), "videos": video_summaries}
