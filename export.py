"""Export a trained RetinaNet to one ONNX file, the whole detector inside (examples: --help).

The graph takes one ``uint8 [3, H, W]`` RGB image (any H and W, or exactly --fixed-size)
and returns ``boxes [D, 4]`` (x1, y1, x2, y2 in that image's pixels), ``scores [D]`` and
``labels [D]`` sorted by score: resizing, normalisation, padding, backbone, FPN, heads,
per-level top-k, decoding, clipping, class-aware NMS and the detection cap all run
inside it (``deploy/graph.py``). The category table goes into the file's metadata and
``<output>.json`` beside it. --verify runs ONNX Runtime and PyTorch on the same images and
fails past the tolerances. ``inference.py --onnx`` runs the file like a checkpoint.
"""
import argparse
import logging
import os
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from deploy.onnx_export import DEFAULT_OPSET, EXPORTER, export_onnx, sidecar_path
from deploy.ort_detector import OnnxDetector
from deploy.verify import BOX_TOLERANCE, SCORE_TOLERANCE, verification_images, verify
from model.weights import load_detector
from utils.data.image_io import ImageReadError, read_image
from utils.data.inputs import list_images
from utils.runtime.cli import HelpFormatter
from utils.runtime.errors import UserError, exit_on_user_error
from utils.runtime.logger import setup_logging

logger = logging.getLogger("export")

EXAMPLES = """examples:
  python export.py --checkpoint output/checkpoint.pth --output model.onnx --verify
  python export.py --weights RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1 --output retinanet_v2.onnx \\
      --verify --images photos/
  python export.py --checkpoint output/checkpoint.pth --fixed-size 512 512 --output model_512.onnx  # TensorRT
"""
MAX_OPSET = 20  # the TorchScript exporter's newest

# ModelConfig fields export.py may replace: they are baked into the graph as constants.
OVERRIDES = ("min_size", "max_size", "score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")


class VerificationError(UserError):
    """ONNX Runtime and PyTorch disagree beyond the tolerances."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("export.py", description="Export a RetinaNet to ONNX (one uint8 image in, "
                                     "boxes/scores/labels out) and check it against PyTorch.", epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint written by train.py; the model is rebuilt from it alone")
    source.add_argument("--weights", help="a checkpoint, a torchvision RetinaNet state-dict file, or a torchvision "
                        "weights name such as RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1")
    parser.add_argument("--output", default="model.onnx", help="the ONNX file to write (replaced if it exists); "
                        "its metadata also goes to <output without .onnx>.json")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {DEFAULT_OPSET}-{MAX_OPSET}")
    parser.add_argument("--fixed-size", type=int, nargs=2, metavar=("H", "W"),
                        help="export for [3, H, W] images only, every shape static (TensorRT and other static "
                        "runtimes); the graph still resizes them to the model's min/max size")
    parser.add_argument("--verify", action="store_true", help="run ONNX Runtime and PyTorch on the same images and "
                        "exit non-zero if detections differ beyond the tolerances")
    parser.add_argument("--images", nargs="+", help="with --verify: image files, folders or quoted globs; "
                        "None = --num-images synthetic scenes")
    parser.add_argument("--num-images", type=int, default=3, help="synthetic scenes for --verify without --images")
    parser.add_argument("--score-tolerance", type=float, default=SCORE_TOLERANCE, help="largest score difference")
    parser.add_argument("--box-tolerance", type=float, default=BOX_TOLERANCE, help="largest box corner difference (px)")
    overrides = parser.add_argument_group("baked into the graph (None = the weights' own value)")
    overrides.add_argument("--min-size", type=int, help="shorter side the graph resizes images to")
    overrides.add_argument("--max-size", type=int, help="cap on the longer side after resizing")
    overrides.add_argument("--score-thresh", type=float, help="no detection below this score leaves the graph")
    overrides.add_argument("--nms-thresh", type=float, help="IoU above which NMS drops the lower-scoring box")
    overrides.add_argument("--detections-per-img", type=int, help="at most this many detections per image")
    overrides.add_argument("--topk-candidates", type=int, help="candidates per pyramid level before NMS")
    return parser


def check_args(args) -> None:
    if not DEFAULT_OPSET <= args.opset <= MAX_OPSET:
        raise UserError(f"--opset {args.opset}: choose {DEFAULT_OPSET} to {MAX_OPSET}")
    if args.fixed_size is not None and min(args.fixed_size) < 1:
        raise UserError(f"--fixed-size {args.fixed_size[0]} {args.fixed_size[1]}: both sides must be >= 1")
    if args.num_images < 1 or args.score_tolerance < 0 or args.box_tolerance < 0:
        raise UserError("--num-images must be >= 1 and the tolerances >= 0")
    if args.images and not args.verify:
        raise UserError("--images are the images --verify checks; add --verify")
    if not args.output.endswith(".onnx"):
        raise UserError(f"--output {args.output}: the file name must end with .onnx")
    folder = os.path.dirname(os.path.abspath(args.output))
    if os.path.exists(folder) and not os.access(folder, os.W_OK):
        raise UserError(f"--output {args.output}: cannot write into {folder}")


def load_verification_images(args) -> list:
    """(name, ByteTensor[3, H, W]) from --images, or synthetic scenes of the sizes the export takes."""
    if not args.images:
        return None
    paths, _ = list_images(args.images)
    images = []
    for path in paths:
        try:
            images.append((os.path.basename(path), read_image(path)))
        except ImageReadError as exc:
            logger.warning("skipped: %s", exc)
    if not images:
        raise UserError(f"--images {' '.join(args.images)}: no readable image")
    return images


def report(records: list, args) -> None:
    logger.info("%-32s %11s %8s %6s %11s %11s  %s", "image", "H x W", "PyTorch", "ONNX", "score diff", "box diff",
                "")
    for record in records:
        logger.info("%-32s %11s %8d %6d %11.2e %11.2e  %s", record["name"][:32],
                    "%d x %d" % record["size"], *record["count"], record["score_diff"], record["box_diff"],
                    "ok" if record["ok"] else "DIFFERENT")
    score_diff = max(r["score_diff"] for r in records)
    box_diff = max(r["box_diff"] for r in records)
    logger.info("largest differences: score %.2e (tolerance %g), box %.2e px (tolerance %g)",
                score_diff, args.score_tolerance, box_diff, args.box_tolerance)
    failed = [r for r in records if not r["ok"]]
    if failed:
        counts = "; ".join(f"{r['name']}: {r['count'][0]} vs {r['count'][1]} detections" for r in failed[:3])
        raise VerificationError(f"ONNX Runtime differs from PyTorch on {len(failed)} of {len(records)} images "
                                f"({counts}; largest score diff {score_diff:.2e}, box diff {box_diff:.2e} px)")


def main(args) -> dict:
    check_args(args)
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    spec = args.checkpoint or args.weights
    model, categories = load_detector(spec, map_location="cpu",
                                      what="checkpoint" if args.checkpoint else "weights file", **overrides)
    user_images = load_verification_images(args) if args.verify else None
    start = time.perf_counter()
    logger.info("exporting %s (%s, %d classes, min_size %s, max_size %s) with the %s exporter, opset %d ...",
                spec, model.model_config.backbone, model.num_classes, model.transform.min_size[-1],
                model.transform.max_size, EXPORTER, args.opset)
    try:
        metadata = export_onnx(model, args.output, categories, opset=args.opset, fixed_size=args.fixed_size,
                               source=spec)
    except OSError as exc:
        raise UserError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
    logger.info("wrote %s (%.1f MB, input %s, %.1f s) and %s", args.output, os.path.getsize(args.output) / 2 ** 20,
                "uint8 [3, H, W]" if args.fixed_size is None else "uint8 [3, %d, %d]" % tuple(args.fixed_size),
                time.perf_counter() - start, sidecar_path(args.output))
    summary = {"output": args.output, "metadata": metadata}
    if args.verify:
        detector = OnnxDetector(args.output, device="cpu")
        images = user_images or verification_images(args.num_images, args.fixed_size, model.transform.min_size[-1],
                                                     model.transform.max_size)
        with logging_redirect_tqdm():
            records = verify(model, detector, tqdm(images, desc="verify", unit="img"), args.score_tolerance,
                             args.box_tolerance)
        summary["verification"] = records
        report(records, args)
    return summary


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())
