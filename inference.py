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
"""
import argparse
import glob
import logging
import os
import re
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from deploy.ort_detector import OnnxDetector
from model.weights import load_detector
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.checkpoint import CheckpointError
from utils.runtime.cli import HelpFormatter
from utils.data.coco_annotations import read_image_list
from utils.evaluation.coco_results import CocoResultsWriter
from utils.runtime.device import AMP_CHOICES, autocast, autocast_dtype, resolve_device
from utils.runtime.errors import UserError, exit_on_user_error
from utils.data.image_io import IMAGE_EXTENSIONS, ImageReadError, is_image_file, read_image
from utils.runtime.logger import setup_logging
from utils.visual.video import VIDEO_EXTENSIONS, VideoReadError, is_video_file, process_video
from utils.visual.visualize import draw_detections, save_image

logger = logging.getLogger("inference")

EXAMPLES = """examples:
  python inference.py --checkpoint output/checkpoint.pth --input photos/ --output-dir photos_detected
  python inference.py --weights RetinaNet_ResNet50_FPN_Weights.COCO_V1 --input "shots/*.png" img.jpg --amp
  python inference.py --onnx model.onnx --input photos/ --device cpu    # exported by export.py, ONNX Runtime
"""


class InferenceError(UserError, RuntimeError):
    """Inputs or outputs the run cannot work with; the command line prints it as one line."""


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
    return parser


def list_images(inputs, recursive: bool = False):
    """Expand --input values into ``(absolute image paths in order, each once; number of missing inputs)``.

    A folder or glob contributes only files with an image extension; a file named
    explicitly is always taken, so an unreadable one is reported rather than ignored.
    """
    found, num_missing = [], 0
    for item in inputs:
        if os.path.isdir(item):
            if recursive:
                paths = [os.path.join(root, name) for root, dirs, names in os.walk(item) for name in names]
            else:
                paths = [entry.path for entry in os.scandir(item) if entry.is_file()]
            paths = sorted(path for path in paths if is_image_file(path) or is_video_file(path))
        elif os.path.isfile(item):
            paths = [item]
        elif glob.has_magic(item):
            paths = sorted(path for path in glob.glob(item, recursive=recursive)
                           if os.path.isfile(path) and (is_image_file(path) or is_video_file(path)))
        else:
            logger.warning("skipped input %s: no such file or folder", item)
            num_missing += 1
            continue
        if not paths:
            logger.warning("input %s: no image or video files (extensions %s)", item,
                           " ".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))
        found.extend(os.path.abspath(path) for path in paths)
    return list(dict.fromkeys(found)), num_missing


def output_names(paths, extension: str) -> list:
    """``<stem>.<extension>`` per input; repeated stems (a.jpg + a.png, or two folders) get ``_2``, ``_3``."""
    names, taken = [], set()
    for path in paths:
        stem = Path(path).stem
        name, count = f"{stem}.{extension}", 1
        while name.lower() in taken:  # lower(): case-insensitive file systems would merge A.jpg and a.jpg
            count += 1
            name = f"{stem}_{count}.{extension}"
        taken.add(name.lower())
        names.append(name)
    return names


def check_outputs(output_dir, names, inputs, overwrite: bool) -> None:
    """Refuse to clobber an earlier run's results in --output-dir without --overwrite, and an input image ever."""
    if output_dir is None:
        return  # a fresh run folder is made for us
    targets = [Path(output_dir) / name for name in names]
    clobbered_inputs = set(map(os.path.realpath, inputs)) & {os.path.realpath(t) for t in targets}
    if clobbered_inputs:
        raise InferenceError(f"--output-dir {output_dir} would overwrite input image {sorted(clobbered_inputs)[0]}; "
                             "choose another output directory")
    existing = [t.name for t in targets + [Path(output_dir) / "detections.json"] if t.exists()]
    if existing and not overwrite:
        raise InferenceError(f"{output_dir} already holds {len(existing)} of this run's output files "
                             f"(e.g. {existing[0]}); pass --overwrite to replace them or choose another --output-dir")


def make_output_dir(output_dir) -> Path:
    """Create --output-dir, or without one a new ``inference_output/run_<N>`` (N one above the highest there)."""
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return Path(output_dir)
    parent = Path("inference_output")
    parent.mkdir(exist_ok=True)
    runs = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"run_(\d+)", p.name))]
    number = max(runs, default=0) + 1
    while True:  # mkdir without exist_ok: two runs started together still get different folders
        try:
            (parent / f"run_{number}").mkdir()
            return parent / f"run_{number}"
        except FileExistsError:
            number += 1


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


class ImageFiles(Dataset):
    """``(index, ByteTensor[3, H, W] or None, error message or None)``: a bad file is a value, not an exception."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, read_image(self.paths[index]), None
        except ImageReadError as exc:
            return index, None, str(exc)


def keep_as_list(batch):
    return batch  # images differ in size; the model takes a list


@torch.inference_mode()
def predict(model, images, device: torch.device, amp_dtype=None) -> list:
    """Model outputs on the CPU in float32, boxes ``[D, 4]`` in each image's own pixels."""
    if isinstance(model, OnnxDetector):  # one image per ONNX Runtime call, numpy in and out
        return [{key: torch.from_numpy(value) for key, value in model(image.numpy()).items()} for image in images]
    with autocast(device, amp_dtype):
        outputs = model([image.to(device, non_blocking=True) for image in images])
    return [{key: output[key].float().cpu() if key != "labels" else output[key].cpu()
             for key in ("boxes", "scores", "labels")} for output in outputs]


def image_record(path, output_name, image, boxes, scores, labels, categories) -> dict:
    """One detections.json entry; boxes ``[D, 4]`` x1y1x2y2 in ``image``'s pixels, labels index ``categories``."""
    detections = [{"box": [round(v, 2) for v in box.tolist()], "score": round(float(score), 4),
                   "category_id": categories[int(label)]["id"], "category_name": categories[int(label)]["name"]}
                  for box, score, label in zip(boxes, scores, labels)]
    return {"file_name": os.path.basename(path), "image_path": path, "width": int(image.shape[2]),
            "height": int(image.shape[1]), "output_file": output_name, "detections": detections}


def frames_file_name(video_name: str) -> str:
    return f"{Path(video_name).stem}_frames.json"


def detect_videos(videos, names, model, device, amp_dtype, categories, output_dir: Path, args):
    """Each video: a drawn copy and its per-frame JSON (utils/visual/video.py). ``(summaries, number not readable)``."""
    class_names = [category["name"] for category in categories]

    def detect(frames):
        outputs = predict(model, frames, device, amp_dtype)
        return [{k: output[k][output["scores"] >= args.score_threshold] for k in ("boxes", "scores", "labels")}
                for output in outputs]

    def draw(frame, found):
        return draw_detections(frame, found["boxes"], found["labels"], found["scores"], class_names)

    def describe(frame, found):
        return image_record("", "", frame, found["boxes"], found["scores"], found["labels"], categories)["detections"]

    summaries = []
    for path, name in zip(videos, names):
        try:
            summary = process_video(path, output_dir / name, output_dir / frames_file_name(name), detect, draw,
                                    describe, every=args.every, batch_size=args.batch_size)
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
        if made_output_dir and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise InferenceError(f"none of the {num_skipped} input videos could be read (see the warnings above)")
    logger.info("%d videos, %d frames, %d detections (%d skipped) -> %s", len(summaries),
                sum(s["num_frames"] for s in summaries), sum(s["num_detections"] for s in summaries), num_skipped,
                output_dir)
    return {"num_images": 0, "num_detections": sum(s["num_detections"] for s in summaries),
            "num_skipped": num_skipped, "output_dir": str(output_dir), "videos": summaries}


def main(args) -> dict:
    """Returns the run's summary; raises InferenceError when nothing could be processed."""
    if args.batch_size < 1 or args.workers < 0 or not 0 <= args.score_threshold <= 1 or args.every < 1:
        raise InferenceError("--batch-size and --every must be >= 1, --workers >= 0 and --score-threshold in [0, 1]")
    paths, num_skipped = list_images(args.input, args.recursive)
    if not paths:
        raise InferenceError(f"no image files (and no videos) found in --input {' '.join(args.input)}")
    videos, paths = [p for p in paths if is_video_file(p)], [p for p in paths if not is_video_file(p)]
    names, video_names = output_names(paths, args.image_format), output_names(videos, "mp4")
    check_outputs(args.output_dir, names + video_names + [frames_file_name(name) for name in video_names],
                  paths + videos, args.overwrite)
    coco_results = coco_results_writer(args, paths)
    if args.onnx:
        model, device, amp_dtype = load_onnx_model(args), torch.device("cpu"), None  # images stay on the CPU
        categories = model.categories
    else:
        device = resolve_device(args.device)
        amp_dtype = autocast_dtype(args.amp, device)
        model, categories = load_model(args)
        model.to(device).optimize_for(device)
    output_dir = make_output_dir(args.output_dir)
    video_summaries, num_failed = detect_videos(videos, video_names, model, device, amp_dtype, categories,
                                                output_dir, args)
    num_skipped += num_failed
    if not paths:
        return finish_videos(video_summaries, num_skipped, output_dir, args.output_dir is None)
    loader = DataLoader(ImageFiles(paths), batch_size=args.batch_size, num_workers=min(args.workers, len(paths)),
                        collate_fn=keep_as_list, pin_memory=device.type == "cuda")
    logger.info("%d images -> %s (device %s%s)", len(paths), output_dir, device,
                f", autocast {amp_dtype}" if amp_dtype else "")

    class_names = [category["name"] for category in categories]
    records, num_detections, model_seconds = [], 0, 0.0
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
                    keep = output["scores"] >= args.score_threshold
                    boxes, scores, labels = output["boxes"][keep], output["scores"][keep], output["labels"][keep]
                    save_image(draw_detections(image, boxes, labels, scores, class_names), output_dir / names[index])
                    records.append(image_record(paths[index], names[index], image, boxes, scores, labels, categories))
                    num_detections += len(scores)
            progress.update(len(batch))
    elapsed = time.perf_counter() - start

    if not records and not video_summaries:
        if args.output_dir is None and not any(output_dir.iterdir()):
            output_dir.rmdir()  # leave no empty run folder behind
        raise InferenceError(f"none of the {len(paths)} input images could be read (see the warnings above)")
    write_json_atomic(output_dir / "detections.json", records)
    if coco_results is not None:
        logger.info("%d detections on %d images in COCO results format -> %s", len(coco_results.results),
                    coco_results.num_images, coco_results.write())
    logger.info("%.1f images/s end to end (model alone %.1f images/s)",
                len(records) / max(elapsed, 1e-9), len(records) / max(model_seconds, 1e-9))
    logger.info("%d images, %d detections (score >= %g), %d skipped -> %s",
                len(records), num_detections, args.score_threshold, num_skipped, output_dir)
    return {"num_images": len(records), "num_detections": num_detections, "num_skipped": num_skipped,
            "output_dir": str(output_dir), "videos": video_summaries}


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())
