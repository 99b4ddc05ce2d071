"""COCO bbox evaluation of a RetinaNet checkpoint or ONNX export (pycocotools, the numbers papers report).

    python evaluation.py --checkpoint output/checkpoint.pth
    python evaluation.py --onnx model_int8.onnx --data-path data/demo --split val   # export.py's file
    torchrun --nproc_per_node 8 evaluation.py --checkpoint output/checkpoint.pth --data-path /data/coco
    python evaluation.py --results output/eval_val2017/results.json --data-path /data/coco --split val2017
    python evaluation.py --checkpoint model_final.pth --results-only --data-path /data/coco \
        --split test-dev2017 --image-dir /data/coco/test2017     # results.json for the COCO server

The model is rebuilt from the checkpoint alone. Under torchrun every rank runs its
shard of the split and rank 0 scores the union. Rank 0 writes into --output-dir:
``results.json`` (the COCO results list), ``metrics.json`` (the 12 COCO figures as
fractions, ``null`` where the split has no ground truth for a figure, plus
``per_category``: {name: AP}) and, with --plot, precision-recall PNGs. --results-only
writes ``results.json`` alone, for a split without ground truth (an image-info file such as
COCO test-dev's ``image_info_test-dev2017.json``: images and categories, no annotations).

The evaluation loop itself is ``engine.evaluate``, which train.py also calls after an epoch.
An --onnx file (float or INT8, from export.py) runs in ONNX Runtime one image per call
(``deploy.predict.OnnxEvalModel``) through the same loader, matching and report; its
category table comes from the file's metadata.

Large images: a model trained on crops (``config["crop_size"] > 0``) is evaluated on whole
images tile by tile, at its own window and scale, without a flag (as after each training
epoch); ``--tile N`` tiles any model, ``--tile 0`` turns it off (``model/tiling.py``).
With --onnx the graph takes one window and the tiling and merge run around it.
"""
import argparse
import logging
import os
from pathlib import Path

import torch
from pycocotools.coco import COCO

import coco_dataset
from deploy.ort_detector import OnnxDetector
from deploy.predict import OnnxEvalModel, add_tile_arguments, tile_options
from engine import evaluate, predict_coco_results, report_coco_metrics
from model.weights import load_detector, read_weights
from utils.data.coco_annotations import build_coco_index, load_coco_json, parse_coco_detection
from utils.data.loaders import build_eval_loader
from utils.evaluation.coco_results import read_results_file
from utils.runtime import distributed
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.device import AMP_CHOICES, resolve_device
from utils.runtime.errors import UserError, exit_on_user_error
from utils.runtime.logger import setup_logging

logger = logging.getLogger("evaluation")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RetinaNet COCO evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint to evaluate; the model is rebuilt from it alone")
    source.add_argument("--results", help="score this existing COCO results JSON instead of running a model")
    source.add_argument("--weights", help="instead of --checkpoint: a torchvision RetinaNet state-dict file or "
                        "weights name (e.g. RetinaNet_ResNet50_FPN_Weights.COCO_V1); needs --data-path")
    source.add_argument("--onnx", help="a model exported by export.py (float or --int8), run with ONNX Runtime "
                        "one image at a time; needs --data-path (or --ann-file and --image-dir)")
    parser.add_argument("--data-path", help="COCO root with annotations/ and <split>/; None = the checkpoint's data_path")
    parser.add_argument("--split", help="split to evaluate; None = the checkpoint's val_split, else val2017")
    parser.add_argument("--ann-file", help="ground-truth JSON (with --results-only: an image-info JSON, images and "
                        "categories without annotations, is enough); None = <data-path>/annotations/"
                        "instances_<split>.json, with --results-only else image_info_<split>.json")
    parser.add_argument("--image-dir", help="image folder; None = <data-path>/<split> (COCO test-dev: "
                        "<data-path>/test2017)")
    parser.add_argument("--results-only", action="store_true", help="with --checkpoint/--weights: write "
                        "results.json (COCO results format, ready to submit) and do not score; for a split "
                        "without ground truth such as COCO test-dev")
    parser.add_argument("--output-dir", help="where results.json / metrics.json / PNGs go; None = eval_<split> "
                        "next to the checkpoint (with --results: the results file's folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (per process)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (per process)")
    parser.add_argument("--amp", nargs="?", const="auto", default="none", choices=AMP_CHOICES,
                        help="autocast the forward pass; auto (or a bare --amp) = fp16 on CUDA, bf16 on CPU")
    parser.add_argument("--device", default="auto", help="auto (this rank's GPU if CUDA is there, else cpu), cpu, cuda")
    parser.add_argument("--plot", action="store_true", help="also save precision-recall curves (needs matplotlib)")
    add_tile_arguments(parser)
    return parser


def _load_ground_truth(ann_file: Path) -> COCO:
    if not ann_file.is_file():
        raise UserError(f"ground truth {ann_file} not found; pass --data-path/--split or --ann-file")
    logger.info("loading ground truth %s", ann_file)
    dataset = load_coco_json(ann_file)
    parse_coco_detection(dataset, source=str(ann_file))  # a malformed file: one line naming the entry
    return build_coco_index(dataset)


def score_results_file(args) -> dict:
    """--results: score an existing COCO results JSON; no model, no checkpoint."""
    split = args.split or "val2017"
    if args.ann_file is None and args.data_path is None:
        raise UserError("--results needs the ground truth: pass --data-path (with --split) or --ann-file")
    ann_file = Path(args.ann_file or Path(args.data_path) / "annotations" / f"instances_{split}.json")
    read_results_file(args.results)  # a missing or malformed file is named before the ground truth is loaded
    coco_gt = _load_ground_truth(ann_file)
    results = read_results_file(args.results, coco_gt.getImgIds(), coco_gt.getCatIds(), str(ann_file))
    output_dir = args.output_dir or Path(args.results).parent
    return report_coco_metrics(coco_gt, results, output_dir, plot=args.plot)


def evaluate_checkpoint(args, device: torch.device) -> dict:
    """--checkpoint / --weights: rebuild the model, build the split's loader (sharded under DDP), evaluate."""
    source = read_weights(args.checkpoint or args.weights, what="checkpoint" if args.checkpoint else "weights file")
    saved_args = source.train_args or {}
    spec = args.checkpoint or args.weights
    default_output = Path(spec).parent if os.path.isfile(spec) else Path(".")
    data_path = args.data_path or saved_args.get("data_path")
    split = args.split or saved_args.get("val_split") or "val2017"
    if data_path is None and not (args.ann_file and args.image_dir):
        raise UserError(f"{spec} stores no data_path; pass --data-path (or --ann-file and --image-dir)")
    dataset = _dataset(args, data_path, split)
    label_to_cat_id = [category["id"] for category in source.categories]
    unknown = sorted(set(label_to_cat_id) - set(dataset.coco.getCatIds()))
    if unknown:
        raise UserError(f"{spec}: category ids {unknown} are not in {split}'s annotations; "
                        "was the model trained on another dataset?")
    model, _ = load_detector(source)  # after the data: a bad annotation file is reported in seconds

    # Shards under DDP; unreadable images are reported and skipped rather than ending the run.
    data_loader = build_eval_loader(dataset, args.batch_size, args.workers, distributed.get_rank(),
                                    distributed.get_world_size(), pin_memory=device.type == "cuda")
    output_dir = args.output_dir or default_output / f"eval_{split}"
    logger.info("evaluating %s on %s (%d images, %d process(es), device %s)",
                spec, split, len(dataset), distributed.get_world_size(), device)
    model = model.to(device).optimize_for(device)
    if args.results_only:
        return write_results_only(model, data_loader, label_to_cat_id, device, Path(output_dir), args.amp,
                                  tiling=tile_options(args))
    return evaluate(model, data_loader, dataset.coco, label_to_cat_id, device,
                    output_dir=output_dir, amp=args.amp, plot=args.plot, tiling=tile_options(args))


def evaluate_onnx(args) -> dict:
    """--onnx: the exported file in ONNX Runtime over the split, scored as a checkpoint is."""
    if args.amp != "none":
        raise UserError("--amp applies to PyTorch models; an --onnx model runs in the precision it was exported in")
    if args.data_path is None and not (args.ann_file and args.image_dir):
        raise UserError(f"--onnx {args.onnx}: pass --data-path (with --split), or --ann-file and --image-dir")
    split = args.split or "val2017"
    dataset = _dataset(args, args.data_path, split)
    detector = OnnxDetector(args.onnx, device="cpu" if args.device == "auto" else args.device)
    label_to_cat_id = [category["id"] for category in detector.categories]
    unknown = sorted(set(label_to_cat_id) - set(dataset.coco.getCatIds()))
    if unknown:
        raise UserError(f"{args.onnx}: category ids {unknown} are not in {split}'s annotations; "
                        "was the model trained on another dataset?")
    data_loader = build_eval_loader(dataset, args.batch_size, args.workers, distributed.get_rank(),
                                    distributed.get_world_size())
    output_dir = Path(args.output_dir or Path(args.onnx).parent / f"eval_{split}")
    logger.info("evaluating %s on %s (%d images, %d process(es), ONNX Runtime %s)", args.onnx, split, len(dataset),
                distributed.get_world_size(), ", ".join(detector.providers))
    model, cpu = OnnxEvalModel(detector), torch.device("cpu")  # images stay on the CPU, ORT moves them
    if args.results_only:
        return write_results_only(model, data_loader, label_to_cat_id, cpu, output_dir, tiling=tile_options(args))
    return evaluate(model, data_loader, dataset.coco, label_to_cat_id, cpu, output_dir=output_dir, plot=args.plot,
                    tiling=tile_options(args))


def _dataset(args, data_path, split: str) -> coco_dataset.CocoDetection:
    """The split to run on: ``--ann-file`` / ``--image-dir`` where given, else the COCO layout under data_path."""
    annotations = Path(data_path or ".") / "annotations"
    ann_file = args.ann_file or annotations / f"instances_{split}.json"
    if args.results_only and not args.ann_file and not Path(ann_file).is_file():
        ann_file = annotations / f"image_info_{split}.json"  # COCO's name for a split without ground truth
    image_dir = args.image_dir or Path(data_path or ".") / split
    return coco_dataset.CocoDetection(image_dir, ann_file, image_info=args.results_only)


def write_results_only(model, data_loader, label_to_cat_id, device, output_dir: Path, amp="none",
                       tiling=None) -> dict:
    """--results-only: the COCO results of every image into ``output_dir/results.json``, nothing scored."""
    results, image_ids = predict_coco_results(model, data_loader, label_to_cat_id, device, amp, tiling=tiling)
    path = output_dir / "results.json"
    if distributed.is_main_process():
        write_json_atomic(path, results)
        logger.info("wrote %d detections on %d images to %s (COCO results format; for the COCO server, "
                    "rename it detections_<split>_<method>_results.json and zip it)", len(results),
                    len(image_ids), path)
        if not results:
            logger.warning("no detections at all: check the model and --image-dir")
    return {"results_file": str(path), "num_images": len(image_ids), "num_detections": len(results)}


def main(args) -> dict:
    """Returns the metrics (on every rank with --checkpoint; None off rank 0 with --results)."""
    device = resolve_device(args.device, distributed.launched_by_torchrun().local_rank)
    distributed.init_distributed_mode(device)
    setup_logging(verbose=False)
    if args.results_only and args.results:
        raise UserError("--results-only runs a model: give --checkpoint, --weights or --onnx, not --results")
    tiling = tile_options(args)  # a bad --tile value is reported before anything loads
    if args.results and (args.tile is not None or tiling.tiling_flags()):
        raise UserError("--tile flags choose how a model runs; --results scores a file of detections")
    try:
        if args.results:  # scoring a file is one process's job
            return score_results_file(args) if distributed.is_main_process() else None
        if args.onnx:
            return evaluate_onnx(args)
        return evaluate_checkpoint(args, device)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    exit_on_user_error(main, get_args_parser().parse_args())
