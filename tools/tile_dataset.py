"""Cut a COCO-format dataset of large images into a COCO-format dataset of tiles, for other tools.

    python tools/tile_dataset.py --data-path data/survey --split train --output data/survey_tiles --tile 512
    python tools/tile_dataset.py --data-path data/survey --split val --output data/survey_tiles --overlap 0.25

writes ``OUTPUT/annotations/instances_SPLIT.json`` and ``OUTPUT/SPLIT/`` with one image per
``--tile`` x ``--tile`` window (smaller where the image is: tiles are never padded nor
resized), windows ``--overlap`` apart in both directions, the last row and column flush with
the image's border. A box keeps its label, clipped to the tile, when at least ``--min-visible``
of its area lies inside; a box cut more than that becomes an ignored region (``iscrowd`` 1,
clipped), so that a detector is neither taught a sliver as an object nor punished for finding
the object there; crowd regions stay crowd. Each tile records ``source_image_id``,
``source_file_name``, ``tile_x`` and ``tile_y`` (its top-left corner in the source image).

train.py does not need this (``--crop-size`` cuts windows on the fly, a fresh draw every
epoch); it is for tools that only read whole images, and for looking at what a window holds.

Why not SAHI's ``slice_coco``: it does the same job well and also clips segmentation polygons,
but it brings opencv-python (pinned <= 4.11), shapely, pybboxes (pinned to one version), pyyaml,
fire, terminaltables, requests and click, none of which this repository otherwise needs, for
what is here about a hundred lines of box arithmetic; and it drops a box whose visible share is
under ``min_area_ratio`` (0.1) instead of marking it ignored, so a cut object becomes background.
Boxes only here: segmentation masks are not written.
"""
import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.data.coco_annotations import load_coco_json, parse_coco_detection  # noqa: E402
from utils.data.image_io import ImageReadError, read_image  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.errors import ConfigError, DatasetNotFoundError, exit_on_user_error  # noqa: E402
from utils.runtime.logger import setup_logging  # noqa: E402

logger = logging.getLogger("tile_dataset")
_KEPT_SUFFIXES = (".jpg", ".jpeg", ".png")  # other formats (tif, bmp, ...) are written as PNG


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tile_dataset.py", description="Cut a COCO-format split of large images into "
                                     "a COCO-format split of tiles (boxes clipped, cut ones ignored).")
    parser.add_argument("--data-path", required=True, help="COCO-format root (annotations/instances_SPLIT.json "
                        "and SPLIT/ images)")
    parser.add_argument("--split", default="train", help="split to tile (default: train)")
    parser.add_argument("--output", required=True, help="root of the tiled dataset (written like --data-path)")
    parser.add_argument("--tile", type=int, default=512, metavar="N", help="tile side in pixels (default 512)")
    parser.add_argument("--overlap", type=float, default=0.2, metavar="F",
                        help="share of a tile the next one overlaps, in [0, 1) (default 0.2)")
    parser.add_argument("--min-visible", type=float, default=0.5, metavar="F", help="a box is kept, clipped, when "
                        "at least this share of its area is inside the tile; less becomes an ignored region "
                        "(default 0.5)")
    parser.add_argument("--drop-empty", action="store_true", help="write no tile without a (non-crowd) box "
                        "(default: keep them, they teach the background)")
    return parser


def _positions(length: int, tile: int, stride: int) -> list:
    """Start of each tile along one side of ``length`` px: ``stride`` apart, the last flush with the end."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_annotations(boxes: np.ndarray, is_crowd: np.ndarray, window: tuple, min_visible: float):
    """The annotations of one tile: ``(keep, ignore, clipped)``.

    Args:
        boxes: ``float [A, 4]`` x1, y1, x2, y2 in the source image, of positive area.
        is_crowd: ``bool [A]``.
        window: ``(x1, y1, x2, y2)`` of the tile in the source image.
        min_visible: share of a box's area that must be inside to keep it as an object.
    Returns:
        ``keep`` and ``ignore`` ``bool [A]`` (objects, ignored regions of this tile) and
        ``clipped`` ``float [A, 4]``, the boxes clipped to the tile in its own pixels.
    """
    x1, y1, x2, y2 = window
    clipped = np.stack([np.clip(boxes[:, 0], x1, x2), np.clip(boxes[:, 1], y1, y2),
                        np.clip(boxes[:, 2], x1, x2), np.clip(boxes[:, 3], y1, y2)], axis=1)
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    present = inside > 0
    keep = present & ~is_crowd & (inside >= min_visible * area)
    ignore = present & ~keep
    return keep, ignore, clipped - np.array([x1, y1, x1, y1], dtype=clipped.dtype)


def _check(args) -> None:
    if args.tile < 1:
        raise ConfigError(f"--tile must be >= 1 pixel, got {args.tile}")
    if not 0 <= args.overlap < 1:
        raise ConfigError(f"--overlap must lie in [0, 1), got {args.overlap}")
    if not 0 < args.min_visible <= 1:
        raise ConfigError(f"--min-visible must lie in (0, 1], got {args.min_visible}")
    if Path(args.output).resolve() == Path(args.data_path).resolve():
        raise ConfigError("--output must differ from --data-path: the tiles would overwrite the images' annotations")


def main(args) -> dict:
    _check(args)
    source = Path(args.data_path) / "annotations" / f"instances_{args.split}.json"
    if not source.is_file():
        raise DatasetNotFoundError(f"annotation file {source} not found")
    dataset = load_coco_json(source)
    parsed = parse_coco_detection(dataset, source=str(source))
    image_dir, out_dir = Path(args.data_path) / args.split, Path(args.output) / args.split
    out_dir.mkdir(parents=True, exist_ok=True)
    stride = max(1, round(args.tile * (1 - args.overlap)))
    images, annotations, skipped = [], [], 0
    for row in tqdm(range(len(parsed.image_ids)), desc="tiling", unit="img"):
        path = image_dir / parsed.file_names[row]
        try:
            pixels = read_image(path)
        except ImageReadError as exc:
            logger.warning("skipped: %s", exc)
            skipped += 1
            continue
        height, width = pixels.shape[-2:]
        if (height, width) != tuple(parsed.image_sizes[row]):
            logger.warning("skipped %s: it decodes to %dx%d (HxW), the annotations say %gx%g", path, height, width,
                           *parsed.image_sizes[row])
            skipped += 1
            continue
        picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        start, end = parsed.ann_offsets[row], parsed.ann_offsets[row + 1]
        boxes, labels, crowd = parsed.boxes[start:end], parsed.labels[start:end], parsed.is_crowd[start:end]
        name = Path(parsed.file_names[row])
        suffix = name.suffix.lower() if name.suffix.lower() in _KEPT_SUFFIXES else ".png"
        for y in _positions(height, args.tile, stride):
            for x in _positions(width, args.tile, stride):
                window = (x, y, min(x + args.tile, width), min(y + args.tile, height))
                keep, ignore, clipped = tile_annotations(boxes, crowd, window, args.min_visible)
                if args.drop_empty and not keep.any():
                    continue
                image_id = len(images) + 1
                file_name = f"{name.stem}_{int(parsed.image_ids[row])}_x{x}_y{y}{suffix}"
                picture.crop(window).save(out_dir / file_name, **({"quality": 95} if suffix != ".png" else {}))
                images.append({"id": image_id, "file_name": file_name, "width": window[2] - x,
                               "height": window[3] - y, "source_image_id": int(parsed.image_ids[row]),
                               "source_file_name": parsed.file_names[row], "tile_x": x, "tile_y": y})
                for index in np.flatnonzero(keep | ignore):
                    x1, y1, x2, y2 = (float(v) for v in clipped[index])
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": int(parsed.cat_ids[labels[index]]),
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                        "iscrowd": int(bool(ignore[index]))})
    categories = [{"id": int(i), "name": n} for i, n in zip(parsed.cat_ids, parsed.category_names)]
    target = Path(args.output) / "annotations" / f"instances_{args.split}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, {"images": images, "annotations": annotations, "categories": categories})
    num_ignored = sum(a["iscrowd"] for a in annotations)
    logger.info("%d images -> %d tiles of %d px (stride %d px), %d boxes and %d ignored regions -> %s%s",
                len(parsed.image_ids) - skipped, len(images), args.tile, stride, len(annotations) - num_ignored,
                num_ignored, target, f"; {skipped} images skipped" if skipped else "")
    return {"num_tiles": len(images), "num_boxes": len(annotations) - num_ignored, "num_ignored": num_ignored,
            "skipped": skipped}


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())
