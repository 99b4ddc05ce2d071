"""Export a trained RetinaNet to one ONNX file, the whole detector inside (examples: --help).

The graph takes one ``uint8 [3, H, W]`` RGB image (any H and W, or exactly --fixed-size)
and returns ``boxes [D, 4]`` (x1, y1, x2, y2 in that image's pixels), ``scores [D]`` and
``labels [D]`` sorted by score: resizing, normalisation, padding, backbone, FPN, heads,
per-level top-k, decoding, clipping, class-aware NMS and the detection cap all run
inside it (``deploy/graph.py``). The category table goes into the file's metadata and
``<output>.json`` beside it. --verify runs ONNX Runtime and PyTorch on the same images and
fails past the tolerances. ``inference.py --onnx`` runs the file like a checkpoint.

--int8 writes a statically quantized model instead (``deploy/quantize.py``: ONNX Runtime's
QDQ format, int8 weights per channel, uint8 activations calibrated on --calibration-images,
pre/post-processing and --int8-keep-float nodes left in float), from a checkpoint or from a
float export (--onnx). Its --verify measures how many of the float model's detections it
finds again (``deploy.verify.compare_runtimes``) and, given a labelled split, both COCO APs.
"""
import argparse
import logging
import os
import tempfile
import time

import torch

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import coco_dataset
from deploy.onnx_export import DEFAULT_OPSET, EXPORTER, export_onnx, sidecar_path
from deploy.ort_detector import OnnxDetector
from deploy.predict import OnnxEvalModel
from deploy.quantize import CALIBRATION_METHODS, DEFAULT_KEEP_FLOAT, load_float_model, quantize_int8
from deploy.verify import (BOX_TOLERANCE, SCORE_TOLERANCE, TOP_K, compare_runtimes, verification_images,
                           verify)
from engine import evaluate
from model.weights import load_detector, read_weights
from utils.data.image_io import ImageReadError, is_image_file, read_image
from utils.data.loaders import build_eval_loader
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
  python export.py --checkpoint output/model_final.pth --int8 --output model_int8.onnx \
      --verify --data-path data/demo --split val      # calibrated on 300 training images
  python export.py --onnx model.onnx --int8 --calibration-images photos/ --output model_int8.onnx
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
    source.add_argument("--onnx", help="with --int8: a float .onnx written by export.py, to quantize")
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
    int8 = parser.add_argument_group("INT8 (ONNX Runtime static quantization)")
    int8.add_argument("--int8", action="store_true", help="write a quantized model: int8 weights per channel, uint8 "
                      "activations, QDQ format; --verify then compares it with the float export")
    int8.add_argument("--calibration-images", nargs="+", help="image files, folders or quoted globs whose "
                      "activations set the ranges; None = the checkpoint's training split (<data_path>/<train_split>)")
    int8.add_argument("--calibration-count", type=int, default=300, help="at most this many calibration images, "
                      "evenly spaced over those found")
    int8.add_argument("--calibration-method", default="minmax", choices=sorted(CALIBRATION_METHODS),
                      help="how activation ranges are set: minmax (the largest seen), percentile (99.999th "
                      "percentile of |x|), entropy (KL divergence of the histogram)")
    int8.add_argument("--int8-keep-float", nargs="*", default=list(DEFAULT_KEEP_FLOAT), metavar="PATTERN",
                      help="network nodes whose name contains one of these stay float, e.g. cls_logits bbox_pred "
                      "(the heads' last convs); the pre/post-processing always does; none = quantize every "
                      "backbone, FPN and head node")
    int8.add_argument("--data-path", help="with --int8 --verify: a COCO-layout root whose labelled --split both "
                      "models are evaluated on (COCO AP)")
    int8.add_argument("--split", default="val", help="with --data-path: the split to evaluate")
    overrides = parser.add_argument_group("baked into the graph (None = the weights' own value)")
    overrides.add_argument("--min-size", type=int, help="shorter side the graph resizes images to")
    overrides.add_argument("--max-size", type=int, help="cap on the longer side after resizing")
    overrides.add_argument("--score-thresh", type=float, help="no detection below this score leaves the graph")
    overrides.add_argument("--nms-thresh", type=float, help="IoU above which NMS drops the lower-scoring box")
    overrides.add_argument("--detections-per-img", type=int, help="at most this many detections per image")
    overrides.add_argument("--topk-candidates", type=int, help="candidates per pyramid level before NMS")
    return parser


def check_args(args) -> None:
    if args.onnx and not args.int8:
        raise UserError(f"--onnx {args.onnx}: export.py only quantizes an existing export; add --int8")
    int8_only = {"--calibration-images": args.calibration_images, "--data-path": args.data_path}
    for flag, value in int8_only.items():
        if value and not args.int8:
            raise UserError(f"{flag} applies to --int8 exports; add --int8")
    if args.calibration_count < 1:
        raise UserError(f"--calibration-count {args.calibration_count}: must be >= 1")
    if args.onnx and os.path.abspath(args.onnx) == os.path.abspath(args.output):
        raise UserError(f"--output {args.output}: choose another file than --onnx, which it would replace")
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


def calibration_images(args, train_args: dict) -> list:
    """Up to --calibration-count image paths, evenly spaced over --calibration-images or the training split."""
    if args.calibration_images:
        inputs, what = args.calibration_images, "--calibration-images " + " ".join(args.calibration_images)
    elif train_args and train_args.get("data_path") and train_args.get("train_split"):
        folder = os.path.join(train_args["data_path"], train_args["train_split"])
        if not os.path.isdir(folder):
            raise UserError(f"the training images {folder} (from the checkpoint) are not here; pass "
                            f"--calibration-images")
        inputs, what = [folder], f"the training split {folder}"
    else:
        raise UserError(f"{args.onnx or args.weights or args.checkpoint} names no training split: pass "
                        f"--calibration-images (a folder of images like those the model will see)")
    paths = [path for path in list_images(inputs)[0] if is_image_file(path)]
    if not paths:
        raise UserError(f"{what}: no image files (extensions .jpg .jpeg .png .bmp .webp)")
    count = min(args.calibration_count, len(paths))
    return [paths[i * len(paths) // count] for i in range(count)]


def quantize(args, float_path: str, train_args: dict, fixed_size, min_size: int, max_size: int) -> dict:
    """--int8: quantize ``float_path`` into --output; with --verify compare the two (and their APs)."""
    paths = calibration_images(args, train_args)
    logger.info("quantizing %s to INT8 (%s calibration, %d images) ...", args.onnx or args.checkpoint or args.weights,
                args.calibration_method, len(paths))
    start = time.perf_counter()
    metadata = quantize_int8(float_path, args.output, paths, args.calibration_method, tuple(args.int8_keep_float))
    logger.info("wrote %s (%.1f MB, %.1f s) and %s", args.output, os.path.getsize(args.output) / 2 ** 20,
                time.perf_counter() - start, sidecar_path(args.output))
    summary = {"output": args.output, "metadata": metadata}
    if not args.verify:
        return summary
    float_model, int8_model = OnnxDetector(float_path), OnnxDetector(args.output)
    images = load_verification_images(args) or verification_images(args.num_images, fixed_size, min_size, max_size)
    comparison = compare_runtimes(float_model, int8_model, images)
    logger.info("INT8 against float on %d images: %d of the float model's %d top-%d detections found again "
                "(same label, IoU >= %.1f): %.1f%%; score difference of the matched: mean %.3f, max %.3f",
                comparison["images"], comparison["matched"], comparison["reference"], TOP_K,
                comparison["iou_threshold"], 100 * comparison["agreement"], comparison["score_diff_mean"],
                comparison["score_diff_max"])
    if comparison["agreement"] < 0.9:
        logger.warning("INT8 finds fewer than 90% of the float detections: try another --calibration-method, "
                       "more --calibration-images or more --int8-keep-float nodes")
    summary["verification"] = comparison
    if args.data_path:
        summary["ap"] = {}
        dataset = coco_dataset.build_dataset(args.data_path, args.split)
        for name, detector in (("float", float_model), ("int8", int8_model)):
            label_to_cat_id = [category["id"] for category in detector.categories]
            metrics = evaluate(OnnxEvalModel(detector), build_eval_loader(dataset, 1, 0), dataset.coco,
                               label_to_cat_id, torch.device("cpu"))
            summary["ap"][name] = {key: metrics[key] for key in ("AP", "AP50", "AP75")}
        ap = summary["ap"]
        logger.info("COCO AP on %s: float %.4f, INT8 %.4f (%+.4f); AP50 %.4f vs %.4f", args.split,
                    ap["float"]["AP"], ap["int8"]["AP"], ap["int8"]["AP"] - ap["float"]["AP"], ap["float"]["AP50"],
                    ap["int8"]["AP50"])
    return summary


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
    if args.onnx:  # quantize an existing float export
        load_float_model(args.onnx)  # not ONNX, or already quantized: said before anything runs
        calibration_images(args, None)
        float_model = OnnxDetector(args.onnx)
        config = float_model.metadata.get("model_config") or {}
        min_size = config.get("min_size", 800)
        min_size = min_size[-1] if isinstance(min_size, (list, tuple)) else min_size
        return quantize(args, args.onnx, None, float_model.fixed_size, min_size, config.get("max_size", 1333))
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    spec = args.checkpoint or args.weights
    source = read_weights(spec, what="checkpoint" if args.checkpoint else "weights file")
    model, categories = load_detector(source, **overrides)
    if args.int8:
        calibration_images(args, source.train_args)  # a bad folder is said before the export
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output)),
                                         prefix=".export.") as folder:
            float_path = os.path.join(folder, "float.onnx")
            export_onnx(model, float_path, categories, opset=args.opset, fixed_size=args.fixed_size, source=spec)
            return quantize(args, float_path, source.train_args, args.fixed_size, model.transform.min_size[-1],
                            model.transform.max_size)
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
