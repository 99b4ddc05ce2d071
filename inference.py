"""Run a trained RetinaNet on image files: drawn copies and one detections.json out (examples: --help).

--input takes image files, folders (their images; sub-folders with --recursive) and
quoted glob patterns, any mix. Into the output directory go ``<stem>.jpg`` for every
readable image (boxes, class names and scores drawn on it) and ``detections.json``:

    [{"file_name": "a.jpg", "image_path": "/abs/a.jpg", "width": W, "height": H, "output_file": "a.jpg",
      "detections": [{"box": [x1, y1, x2, y2], "score": 0.91, "category_id": 3, "category_name": "cat"}]}]

Boxes are absolute pixels of the image as displayed (EXIF orientation applied, so
``width``/``height`` may be the file's swapped). Every readable image is listed, also
with no detections. A file that cannot be decoded is reported and skipped; the exit
status is non-zero only when no image at all could be read.

Videos (.mp4 .avi .mov .mkv .webm, in --input with images or alone) give ``<stem>.mp4``,
drawn at the input's frame rate and exact size, and ``<stem>_frames.json`` with the
detections of every detected frame (frame index, timestamp in seconds); ``--every N``
detects on every Nth frame. Frames stream through in batches, so memory stays flat
on long footage; a broken or truncated video keeps the frames that decoded
(``utils/visual/video.py``).

Large images: a model trained on crops (``train.py --crop-size``) runs on overlapping windows
of its own window and scale with no flag, its detections merged across the seams
(``--tile 0`` turns this off); ``--tile N`` tiles any model, images and videos alike
(``model/tiling.py``; ``--onnx``: the graph takes one window, the tiling runs around it).

This command parses the options and loads the model; the work is library code:
``utils/data/inputs.py`` lists the inputs and names the outputs, ``deploy/predict.py``
runs the detector (eager or ONNX) over images and videos and writes the results.
"""
import argparse
import logging
import os

import torch

from deploy.ort_detector import OnnxDetector
from deploy.predict import (OnnxEvalModel, add_tile_arguments, detect_images, detect_videos, finish_images,
                            finish_videos, tile_options)
from model.tiling import TiledDetector, tile_detector
from model.weights import load_detector
from utils.data.coco_annotations import read_image_list
from utils.data.inputs import (check_outputs, frames_file_name, list_images, make_output_dir,
                               output_names)
from utils.evaluation.coco_results import CocoResultsWriter
from utils.runtime.checkpoint import CheckpointError
from utils.runtime.cli import HelpFormatter
from utils.runtime.device import AMP_CHOICES, autocast_dtype, resolve_device
from utils.runtime.errors import InferenceError, exit_on_user_error
from utils.runtime.logger import setup_logging
from utils.visual.video import is_video_file

logger = logging.getLogger("inference")

EXAMPLES = """examples:
  python inference.py --checkpoint output/checkpoint.pth --input photos/ --output-dir photos_detected
  python inference.py --weights RetinaNet_ResNet50_FPN_Weights.COCO_V1 --input "shots/*.png" img.jpg --amp
  python inference.py --onnx model.onnx --input photos/ --device cpu    # exported by export.py, ONNX Runtime
  python inference.py --checkpoint crops/checkpoint.pth --input big.tif  # trained with --crop-size: tiled
  python inference.py --checkpoint output/checkpoint.pth --input big.tif --tile 800 --tile-overlap 0.2
"""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("inference.py", description="Detect objects in images with a RetinaNet; "
                                     "writes drawn copies and detections.json.", epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint written by train.py; the model is rebuilt from it alone")
    source.add_argument("--weights", help="a checkpoint, a torchvision RetinaNet state-dict file, or a torchvision "
                        "weights name such as RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    source.add_argument("--onnx", help="a model exported by export.py, run with ONNX Runtime (--device picks its "
                        "execution provider: cpu, or cuda with onnxruntime-gpu)")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image and video files, folders and quoted glob patterns ('imgs/*.png')")
    parser.add_argument("--recursive", action="store_true", help="also take images from sub-folders (and ** in globs)")
    parser.add_argument("--output-dir", help="where drawn images and detections.json go; "
                        "None = a fresh inference_output/run_<N> in the current directory")
    parser.add_argument("--overwrite", action="store_true", help="replace results of an earlier run in --output-dir")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep (draw and write) detections scoring at least this")
    parser.add_argument("--coco-results", metavar="FILE", help="also write every detection the model outputs (its "
                        "own score threshold, as evaluation.py) to FILE in COCO results format, with the category "
                        "ids of the model's dataset (evaluation.py --results scores it)")
    parser.add_argument("--image-info", metavar="JSON", help="with --coco-results: the COCO image-info or annotation "
                        "file whose image ids the inputs take (matched by file name); None = 1, 2, ... in input order")
    parser.add_argument("--image-format", default="jpg", choices=["jpg", "png"], help="format of the drawn images")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="videos: detect on every Nth frame; the "
                        "drawn video keeps all frames, each with the boxes of the last detected one")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-decoding worker processes")
    parser.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--amp", nargs="?", const="auto", default="none", choices=AMP_CHOICES,
                        help="autocast the forward pass; auto (or a bare --amp) = fp16 on CUDA, bf16 on CPU")
    tiling = add_tile_arguments(parser)
    tiling.add_argument("--tile-max-detections", type=int, metavar="N", help="with tiling: keep at most N "
                        "detections per image after the merge; None = the model's detections_per_img (raise it "
                        "for large images with many objects)")
    return parser


def load_model(args):
    """``(model in eval mode on CPU, categories [{"id", "name"}] in label order)`` from --checkpoint or --weights."""
    model, categories = load_detector(args.checkpoint or args.weights, map_location="cpu",
                                      what="checkpoint" if args.checkpoint else "weights file")
    if args.checkpoint and not categories:
        raise CheckpointError(f"{args.checkpoint} stores no 'categories': cannot name the classes")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and len(categories) != num_classes:
        raise CheckpointError(f"the model has {num_classes} classes but {len(categories)} categories are named")
    # The model drops low scores before NMS; a lower --score-threshold must reach it.
    if hasattr(model, "score_thresh"):
        model.score_thresh = min(model.score_thresh, args.score_threshold)
    return model.eval(), categories


def load_onnx_model(args) -> OnnxDetector:
    """--onnx: the exported detector in an ONNX Runtime session on the --device's execution provider."""
    if args.amp != "none":
        raise InferenceError("--amp applies to PyTorch models; an --onnx model runs in the precision it was exported in")
    detector = OnnxDetector(args.onnx, device=args.device)
    if args.score_threshold < detector.score_thresh:
        logger.warning("--score-threshold %g is below the score threshold inside %s (%g): no lower score comes out; "
                       "export again with --score-thresh to lower it", args.score_threshold, args.onnx,
                       detector.score_thresh)
    logger.info("%s in ONNX Runtime (%s)", args.onnx, ", ".join(detector.providers))
    return detector


def coco_results_writer(args, paths):
    """--coco-results: a writer knowing each input's image id (from --image-info, else 1, 2, ...), or None."""
    if args.coco_results is None:
        if args.image_info:
            raise InferenceError("--image-info gives the image ids of --coco-results; pass --coco-results FILE too")
        return None
    if os.path.exists(args.coco_results) and not args.overwrite:
        raise InferenceError(f"--coco-results {args.coco_results} exists; pass --overwrite to replace it")
    image_list = read_image_list(args.image_info) if args.image_info else None
    return CocoResultsWriter(args.coco_results, paths, image_list, source=args.image_info)


def main(args) -> dict:
    """Returns the run's summary; raises InferenceError when nothing could be processed."""
    if args.batch_size < 1 or args.workers < 0 or not 0 <= args.score_threshold <= 1 or args.every < 1:
        raise InferenceError("--batch-size and --every must be >= 1, --workers >= 0 and --score-threshold in [0, 1]")
    tiling = tile_options(args)
    paths, num_skipped = list_images(args.input, args.recursive)
    if not paths:
        raise InferenceError(f"no image files (and no videos) found in --input {' '.join(args.input)}")
    videos, paths = [p for p in paths if is_video_file(p)], [p for p in paths if not is_video_file(p)]
    names, video_names = output_names(paths, args.image_format), output_names(videos, "mp4")
    check_outputs(args.output_dir, names + video_names + [frames_file_name(name) for name in video_names],
                  paths + videos, args.overwrite)
    coco_results = coco_results_writer(args, paths)
    if args.onnx:
        detector, device, amp_dtype = load_onnx_model(args), torch.device("cpu"), None  # images stay on the CPU
        categories = detector.categories
        model = tile_detector(OnnxEvalModel(detector), tiling)  # the graph takes one window; tiling runs around it
        if not isinstance(model, TiledDetector):
            model = detector
    else:
        device = resolve_device(args.device)
        amp_dtype = autocast_dtype(args.amp, device)
        model, categories = load_model(args)
        model = tile_detector(model.to(device).optimize_for(device), tiling)
    tile = model.tile if isinstance(model, TiledDetector) else 0
    if tile:
        logger.info("sliced inference: %s", model.describe())
    output_dir, made_output_dir = make_output_dir(args.output_dir), args.output_dir is None
    video_summaries, num_failed = detect_videos(videos, video_names, model, categories, output_dir, device=device,
                                                amp_dtype=amp_dtype, score_threshold=args.score_threshold,
                                                every=args.every, batch_size=args.batch_size)
    num_skipped += num_failed
    if not paths:
        return {**finish_videos(video_summaries, num_skipped, output_dir, made_output_dir), "tile": tile}
    logger.info("%d images -> %s (device %s%s)", len(paths), output_dir, device,
                f", autocast {amp_dtype}" if amp_dtype else "")
    found = detect_images(model, paths, names, categories, output_dir, device=device, amp_dtype=amp_dtype,
                          score_threshold=args.score_threshold, batch_size=args.batch_size, workers=args.workers,
                          coco_results=coco_results)
    summary = finish_images(found, video_summaries, num_skipped + found["num_skipped"], output_dir, made_output_dir,
                            num_images=len(paths), score_threshold=args.score_threshold, coco_results=coco_results)
    return {**summary, "tile": tile}


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())
