"""Check a COCO-format dataset before training on it: counts, box sizes and anchor coverage.

    python tools/check_dataset.py --data-path data/mine --split train                 # coco recipe's anchors
    python tools/check_dataset.py --data-path data/mine --split train --recipe demo --draw 16
    python tools/check_dataset.py --data-path data/mine --anchor-base-sizes 16 32 64 128 256 --json report.json

It takes train.py's --recipe and model options (same defaults, same resolution into a
ModelConfig), so the anchors and the training resolution it checks are exactly those a
``train.py`` run with the same flags would use. Printed: images, boxes, crowd (ignored)
regions and images without boxes, per class; box sizes at the training resolution; the
share of boxes whose best anchor reaches the foreground IoU threshold (and 0.4), per class
and per size range (model/anchor_coverage.py); and, when that share is poor, the cheapest
change of flags found to raise it, with the coverage it gives. ``--draw N`` writes N images
with their ground truth drawn, for a visual check of the boxes.

Large images: the coverage is also measured on crops at native resolution (boxes at their
own size, or times ``--crop-scale``, never resized to ``--min-size``) and at the largest
affordable whole-image size; when whole images stay poor at every affordable size and crops
do better, it suggests ``--crop-size N --crop-scale S`` (and anchors if still needed), with
the coverage, a rough memory per step, and the tiling inference then does by default
(model/crop_advice.py states the rule and the memory model).
"""
import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import coco_dataset  # noqa: E402
from model.anchor_coverage import (FIRST_LEVEL, POOR_COVERAGE, BoxSet, measure_coverage,  # noqa: E402
                                   suggest_settings, training_image_sizes)
from model.anchors import default_anchor_sizes  # noqa: E402
from model.crop_advice import (AFFORDABLE_SIDE, affordable_whole_image_coverage, suggest_crops,  # noqa: E402
                               window_size)
from model.weights import configure_from_weights, read_weights  # noqa: E402
from recipes import resolve_config  # noqa: E402
from train_options import get_args_parser as train_args_parser  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.errors import exit_on_user_error  # noqa: E402
from utils.runtime.logger import setup_logging  # noqa: E402
from utils.visual.visualize import draw_detections, save_image  # noqa: E402

logger = logging.getLogger("check_dataset")
_SHOWN = {"recipe", "data_path"}  # train.py options shown in --help besides the model group


def get_args_parser() -> argparse.ArgumentParser:
    """train.py's parser (so every model option means the same) with the training-only options hidden."""
    parser = train_args_parser()
    parser.prog = "check_dataset.py"
    parser.description = ("Counts, box sizes at the training resolution and anchor coverage of a COCO-format "
                          "split, with the anchors train.py would use given the same --recipe and model options.")
    for group in parser._action_groups:  # argparse has no public way to hide a group
        if group.title not in ("model", "positional arguments", "options", "optional arguments"):
            for action in group._group_actions:
                if action.dest not in _SHOWN:
                    action.help = argparse.SUPPRESS
    check = parser.add_argument_group("check")
    check.add_argument("--split", help="split to check (default: the recipe's --train-split)")
    check.add_argument("--draw", type=int, default=0, metavar="N", help="write N images with their ground truth "
                       "drawn (spread over the split) into --draw-dir")
    check.add_argument("--draw-dir", help="where --draw writes (default: output/dataset_check/SPLIT)")
    check.add_argument("--json", help="also write the figures (and the suggestion) to this JSON file")
    # train.py's crop options, until its parser has them: the same dests, so resolve_config reads them alike.
    if "--crop-size" not in parser._option_string_actions:
        check.add_argument("--crop-size", type=int, metavar="N", help="check training on N x N windows at native "
                           "resolution (times --crop-scale) instead of whole images (default 0: whole images)")
    if "--crop-scale" not in parser._option_string_actions:
        check.add_argument("--crop-scale", type=float, metavar="S", help="with --crop-size: the factor the images "
                           "are scaled by before cropping (default 1: native resolution)")
    return parser


def model_config_of(config):
    """The ModelConfig training would build: the recipe's and flags', or with --weights the weights' own."""
    if not config.weights:
        return config.model
    source = read_weights(config.weights)
    return configure_from_weights(source.config, dict(config.weights_overrides), source.name)


def percentiles(values: torch.Tensor) -> str:
    if len(values) == 0:
        return "n/a"
    points = np.percentile(values.numpy(), [0, 5, 50, 95, 100])
    return "  ".join(f"{p:8.1f}" for p in points)


def describe(dataset, box_set: BoxSet, crowd_labels, model_config, batch_size: int) -> dict:
    """Print the report; return its figures as a plain dict."""
    num_classes, names = dataset.num_classes, dataset.category_names
    coverage = measure_coverage(box_set, model_config)
    crops = suggest_crops(box_set, model_config, batch_size) if coverage.fg < POOR_COVERAGE else None
    images_with_boxes = torch.unique(box_set.image_index)
    pairs = torch.unique(box_set.image_index * num_classes + box_set.labels)  # (image, class) present
    images_per_class = torch.bincount(pairs % num_classes, minlength=num_classes)
    crowd_per_class = torch.bincount(torch.as_tensor(crowd_labels, dtype=torch.long), minlength=num_classes)
    num_empty = len(dataset) - len(images_with_boxes)
    fg, bg = model_config.fg_iou_thresh, model_config.bg_iou_thresh
    print(f"{len(dataset)} images ({num_empty} without boxes), {len(box_set.boxes)} boxes, "
          f"{int(crowd_per_class.sum())} crowd/ignored regions, {num_classes} classes")
    per_class = coverage.by_class(num_classes)
    width = max([len("class")] + [len(n) for n in names])
    print(f"\n{'class':<{width}}  {'images':>7} {'boxes':>8} {'crowd':>6}  {'IoU>=' + f'{fg:g}':>9} "
          f"{'IoU>=' + f'{bg:g}':>9}")
    for k, name in enumerate(names):
        count, share_fg, share_bg = per_class[k]
        print(f"{name:<{width}}  {int(images_per_class[k]):>7} {count:>8} {int(crowd_per_class[k]):>6}  "
              f"{_pct(share_fg):>9} {_pct(share_bg):>9}")

    resized = training_image_sizes(box_set.image_sizes, model_config)
    scale = (resized / box_set.image_sizes)[box_set.image_index]                           # [G, 2] (y, x)
    widths = (box_set.boxes[:, 2] - box_set.boxes[:, 0]) * scale[:, 1]
    heights = (box_set.boxes[:, 3] - box_set.boxes[:, 1]) * scale[:, 0]
    sizes = model_config.fixed_size or f"shorter side {model_config.min_size}, longer side <= {model_config.max_size}"
    if model_config.crop_size:
        sizes = f"{model_config.crop_size} px windows of the images scaled by {model_config.crop_scale:g}"
    print(f"\nbox sizes at the training resolution ({sizes}), px:\n{'':<16}{'min':>8}  {'5%':>8}  {'median':>8}  "
          f"{'95%':>8}  {'max':>8}")
    for label, values in (("sqrt(area)", coverage.box_size), ("width", widths.float()), ("height", heights.float()),
                          ("height/width", (heights / widths.clamp(min=1e-6)).float())):
        print(f"{label:<16}{percentiles(values)}")

    anchor_sizes = default_anchor_sizes(model_config.anchor_base_sizes, model_config.scales_per_octave)
    print(f"\nanchors: sizes {' '.join('/'.join(map(str, s)) for s in anchor_sizes)} on P3-P"
          f"{2 + len(anchor_sizes)}, aspect ratios {' '.join(f'{r:g}' for r in model_config.aspect_ratios)}; "
          f"foreground IoU >= {fg:g}, background < {bg:g}")
    print(f"{'box size':<12} {'boxes':>8}  {'IoU>=' + f'{fg:g}':>9} {'IoU>=' + f'{bg:g}':>9}")
    for low, high, count, share_fg, share_bg in coverage.by_size():
        if count:
            label = f">= {low}" if math.isinf(high) else f"{low}-{high}"
            print(f"{label + ' px':<12} {count:>8}  {_pct(share_fg):>9} {_pct(share_bg):>9}")
    print(f"\nanchor coverage: {_pct(coverage.fg)} of the boxes have an anchor with IoU >= {fg:g} "
          f"({_pct(coverage.share(bg))} >= {bg:g})")
    stride = 2 ** FIRST_LEVEL
    tiny = coverage.box_size < 2 * stride
    if tiny.float().mean() > 0.05 and coverage.share(fg, tiny) < POOR_COVERAGE:
        remedy = "training on crops does (below)" if crops else "scaling the images up (--min-size, --max-size) does"
        print(f"{tiny.float().mean():.0%} of the boxes are under {2 * stride} px at the training resolution, "
              f"twice the {stride} px stride of P3: on a grid that coarse no anchor size fits them all well "
              f"({_pct(coverage.share(fg, tiny))} covered); {remedy}")

    suggestion = suggest_settings(box_set, model_config) if coverage.fg < POOR_COVERAGE else None
    large = describe_large_images(box_set, model_config, crops)
    if crops is not None:
        if suggestion is not None:
            print(f"whole images: with {' '.join(suggestion.flags())} it would be {_pct(suggestion.coverage)}")
        print(f"suggested: {' '.join(crops.flags())}")
    elif suggestion is not None:
        print(f"coverage is poor (< {POOR_COVERAGE:.0%}): with {' '.join(suggestion.flags())} it would be "
              f"{_pct(suggestion.coverage)}\nsuggested: {' '.join(suggestion.flags())}")
    elif len(box_set.boxes) == 0:
        print("no boxes, so nothing to cover")
    elif coverage.fg < POOR_COVERAGE:
        print("coverage is poor, and no change of anchor sizes, scales, aspect ratios or input size tried "
              "raises it by 5 points; the low-quality matches still give every box an anchor")
    else:
        print("coverage is good")
    return {"num_images": len(dataset), "num_images_without_boxes": num_empty, "num_boxes": len(box_set.boxes),
            "num_crowd": int(crowd_per_class.sum()), "coverage": _number(coverage.fg),
            "coverage_0.4": _number(coverage.share(0.4)),
            "fg_iou_thresh": fg, "classes": [{"name": n, "images": int(images_per_class[k]), "boxes": per_class[k][0],
                                              "coverage": _number(per_class[k][1])} for k, n in enumerate(names)],
            "by_size": [{"min": low, "max": None if math.isinf(high) else high, "boxes": count,
                         "coverage": _number(share)}
                        for low, high, count, share, _ in coverage.by_size()],
            "suggestion": None if suggestion is None else {"flags": suggestion.flags(),
                                                           "coverage": suggestion.coverage},
            **large}


def describe_large_images(box_set: BoxSet, model_config, crops) -> dict:
    """Print the coverage on crops and at the largest affordable whole-image size, and the crop
    advice ``crops`` (``model.crop_advice.CropSuggestion`` or None); return those figures."""
    if len(box_set.boxes) == 0:
        return {"training": "crops" if model_config.crop_size else "whole images", "crop_coverage": None,
                "affordable_whole_image_coverage": None, "crop_suggestion": None}
    if model_config.crop_size:
        on_crops = model_config
    else:  # at native resolution, with the model's anchors
        window = window_size(box_set, model_config, crop_scale=1.0)
        on_crops = model_config.replace(crop_size=window, crop_scale=1.0, min_size=window, max_size=window)
    crop_coverage = measure_coverage(box_set, on_crops).fg
    affordable = affordable_whole_image_coverage(box_set.sample(20000), model_config)
    print(f"\non crops ({on_crops.crop_size} px windows of the images scaled by {on_crops.crop_scale:g}, these "
          f"anchors): {_pct(crop_coverage)}; whole images at an affordable size (the recipe's, or longer side "
          f"{AFFORDABLE_SIDE} px; anchors as given, halved or quartered): at most {_pct(affordable)}")
    if crops is not None:
        print(f"objects fall under P3's stride at every affordable whole-image size: train on crops. "
              f"{' '.join(crops.flags())} gives {_pct(crops.coverage)}\n"
              f"memory per step: about {crops.memory_gib:.1f} GiB for {crops.batch_size} windows, against "
              f"{crops.whole_image_memory_gib:.1f} GiB for whole images at longer side {AFFORDABLE_SIDE} (a rough "
              f"model: R-50 with AMP fp16, measured at 800 x 1333 batch 16, scaled by input pixels x batch; fp32 "
              f"about doubles the activations)\ninference: a model trained on crops tiles by default, in "
              f"{crops.tile_window} px windows of the original image (--tile 0 turns it off)")
    advice = None if crops is None else {
        "flags": crops.flags(), "coverage": crops.coverage, "crop_size": crops.crop_size,
        "crop_scale": crops.crop_scale, "anchor_base_sizes": crops.anchor_base_sizes,
        "batch_size": crops.batch_size, "memory_gib_per_step": crops.memory_gib,
        "whole_image_memory_gib_per_step": crops.whole_image_memory_gib, "tile_window": crops.tile_window,
        "line": crops.line()}
    return {"training": "crops" if model_config.crop_size else "whole images",
            "crop_coverage": {"crop_size": on_crops.crop_size, "crop_scale": on_crops.crop_scale,
                              "coverage": _number(crop_coverage)},
            "affordable_whole_image_coverage": _number(affordable), "crop_suggestion": advice}


def _number(share: float):
    return None if math.isnan(share) else share  # JSON has no NaN


def _pct(share: float) -> str:
    return "-" if math.isnan(share) else f"{share:.1%}"


def draw_ground_truth(dataset, count: int, folder: Path) -> None:
    """``count`` images spread over the dataset with their boxes (and crowd regions, as "ignored") drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    indices = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int))
    names = list(dataset.category_names) + ["ignored"]
    for index in tqdm(indices, desc="drawing", unit="img"):
        image, target = dataset[int(index)]
        boxes = torch.cat([target["boxes"], target["crowd_boxes"]])
        labels = torch.cat([target["labels"], torch.full((len(target["crowd_boxes"]),), len(names) - 1)])
        save_image(draw_detections(image, boxes, labels, None, names), folder / f"{target['image_id']}.jpg")
    logger.info("%d images with their ground truth drawn -> %s", len(indices), folder)


def main(args) -> dict:
    config = resolve_config(args)
    split = args.split or config.train_split
    model_config = model_config_of(config)
    dataset = coco_dataset.build_dataset(config.data_path, split)
    print(f"{Path(config.data_path) / 'annotations' / f'instances_{split}.json'} (recipe {config.recipe})")
    arrays = dataset.box_arrays()
    report = describe(dataset, BoxSet.from_arrays(arrays), arrays["crowd_labels"], model_config, config.batch_size)
    if args.json:
        write_json_atomic(args.json, {"data_path": config.data_path, "split": split, **report})
    if args.draw > 0:
        draw_ground_truth(dataset, args.draw, Path(args.draw_dir or Path("output") / "dataset_check" / split))
    return report


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())
