"""Built-in demo dataset: coloured shapes on cluttered backgrounds, in COCO format.

`python train.py` with no dataset trains on this, so it has to be learnable by a
small RetinaNet in minutes on a CPU without being trivial: the category is
decided by shape alone (colours are random per object), objects range from
about 12 px to most of the image, and the background carries gradients, noise
and thin clutter that is not an object.

Layout (exactly like COCO)::

    ROOT/annotations/instances_{split}.json
    ROOT/{split}/000000.jpg ...
    ROOT/.complete          written last; holds the generation parameters

Every image draws from its own ``numpy.random.Generator`` seeded by
``(seed, split, index)``, so the output is the same whatever order (or process)
the images are made in, and the same seed gives byte-identical JSON and pixels.
The drawing itself is `utils/data/demo_shapes.py`; this file decides which images a dataset
holds and writes them.
"""
import argparse
import json
import logging
import os
import time
import zlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.data.demo_shapes import DEMO_CATEGORIES, MIN_OBJECT_SIZE, render_image
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error

logger = logging.getLogger(__name__)

# Bump when the drawing (demo_shapes.py) changes, so ensure_demo_dataset regenerates old copies.
GENERATOR_VERSION = 1

MARKER_NAME = ".complete"
DEMO_DEFAULTS = dict(num_train=3000, num_val=300, image_size=160, empty_fraction=0.05)

# Other kinds of the same data (`--preset NAME`, `preset=NAME`): image counts, size and empty
# fraction (explicit arguments still win), how images are drawn (`render`: render_image's
# options), `size_jitter` (each side drawn per image in [1 - j, 1] x image_size) and `train_size`,
# the side to train at (train.py --min-size / --max-size; None: no whole-image size suits it).
PRESETS = {
    # COCO-like imbalance: 1-2 objects of 10-16 px in a 128 px image (10 % empty), trained at its
    # own size: 128 is a multiple of the model's 128 px padding, so a step costs what a demo step
    # costs (160 would pad to 256: 4x). With the demo recipe's anchors about 1 anchor in 1,200 is
    # foreground (the demo: 1 in 124); objects of 20 px and more match 3-5 anchors each and bring it
    # under 1 in 900. tests/data/test_demo_data.py measures it with the model's matcher.
    "sparse": dict(num_train=3000, num_val=300, image_size=128, empty_fraction=0.1, size_jitter=0.0,
                   train_size=128, render=dict(num_objects=[1, 2], object_size=[10, 16], clutter_scale=1.0)),
    # Large images, small objects (crops and tiles): 2000-3000 px sides, 20-60 objects of 10-40 px,
    # clutter as dense as in a demo image (clutter_scale: a 2750 px side over the demo's 160).
    "large": dict(num_train=24, num_val=8, image_size=[2500, 3000], empty_fraction=0.0, size_jitter=0.2,
                  train_size=None, render=dict(num_objects=[20, 60], object_size=[10, 40], clutter_scale=17.0)),
}


def generation_params(num_train, num_val, image_size, seed, splits, empty_fraction, preset=None) -> dict:
    """Everything that changes the output; stored in the marker and compared by ensure_demo_dataset.

    None takes the preset's value, else the demo's. Without a preset the marker is the demo's as before.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    chosen = {**DEMO_DEFAULTS, **(PRESETS[preset] if preset else {})}
    num_train = chosen["num_train"] if num_train is None else num_train
    num_val = chosen["num_val"] if num_val is None else num_val
    image_size = chosen["image_size"] if image_size is None else image_size
    empty_fraction = chosen["empty_fraction"] if empty_fraction is None else empty_fraction
    splits = tuple(splits)
    if len(splits) != 2 or splits[0] == splits[1]:
        raise ValueError(f"splits must be two distinct names (train, val), got {splits!r}")
    height, width = (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)
    if min(height, width) < 2 * MIN_OBJECT_SIZE:
        raise ValueError(f"image_size {image_size!r} too small: each side must be >= {2 * MIN_OBJECT_SIZE} px")
    if min(num_train, num_val) < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    params = {"version": GENERATOR_VERSION, "num_images": {splits[0]: int(num_train), splits[1]: int(num_val)},
              "image_size": [int(height), int(width)], "seed": int(seed), "splits": list(splits),
              "empty_fraction": float(empty_fraction)}
    if preset is not None:  # how it draws, too: a preset changed in the code regenerates its data
        params.update(preset=preset, render=chosen["render"], size_jitter=chosen["size_jitter"])
    return params


def _image_shape(rng: np.random.Generator, params: dict) -> tuple:
    """(height, width) of one image: the given size, or up to ``size_jitter`` smaller per side."""
    height, width = params["image_size"]
    if not params.get("size_jitter"):
        return height, width  # draws nothing: the demo's random stream is untouched
    factors = rng.uniform(1.0 - params["size_jitter"], 1.0, 2)
    return int(height * factors[0]), int(width * factors[1])


def draw_indexed(params: dict, split: str, index: int):
    """Image `index` of `split` as the dataset with these `generation_params` draws it.

    Returns `render_image`'s `(pixels, label_map, objects)`; the same arguments
    give the same bytes in any process (tools/make_voc_example.py writes the
    same images as VOC files).
    """
    # crc32, not hash(): Python salts str hashes per process, which would break determinism.
    rng = np.random.default_rng([params["seed"], zlib.crc32(split.encode("utf-8")), index])
    height, width = _image_shape(rng, params)
    return render_image(rng, height, width, params["empty_fraction"], **params.get("render", {}))


def _generate_split(root: str, split: str, params: dict, show_progress: bool) -> dict:
    """Write `ROOT/{split}/*.jpg` and return the split's COCO annotation dict."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(params["num_images"][split]), desc=f"demo data [{split}]", disable=not show_progress):
        pixels, _, objects = draw_indexed(params, split, index)
        height, width = pixels.shape[:2]
        file_name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, split, file_name), quality=90)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    return {"info": {"description": "synthetic shapes demo dataset", "version": str(GENERATOR_VERSION)},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [dict(c) for c in DEMO_CATEGORIES]}


def generate_demo_dataset(root: str, num_train: int = None, num_val: int = None, image_size=None,
                          seed: int = 0, splits=("train", "val"), show_progress: bool = True,
                          empty_fraction: float = None, preset: str = None) -> dict:
    """Write the demo dataset under `root` (always regenerates) and return a summary.

    `splits` names the two splits, which get `num_train` and `num_val` images.
    `image_size` is an int or `(height, width)`. `preset` (a PRESETS name)
    draws another kind of data; counts, size and `empty_fraction` left None
    come from it, else from the demo (3000, 300, 160, 0.05). The marker file
    is removed first and written last, so an interrupted run is never
    mistaken for a complete dataset. Returns a dict with `root`,
    `annotation_files`, `image_dirs`, `num_images`, `num_annotations`,
    `params` and `seconds`.
    """
    params = generation_params(num_train, num_val, image_size, seed, splits, empty_fraction, preset)
    marker = os.path.join(root, MARKER_NAME)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    start = time.perf_counter()
    annotation_files = {s: os.path.join(root, "annotations", f"instances_{s}.json") for s in params["splits"]}
    num_annotations = {}
    for split in params["splits"]:
        coco = _generate_split(root, split, params, show_progress)
        write_json_atomic(annotation_files[split], coco, compact=True)
        num_annotations[split] = len(coco["annotations"])
    write_json_atomic(marker, params, compact=True)
    summary = {"root": root, "annotation_files": annotation_files,
               "image_dirs": {s: os.path.join(root, s) for s in params["splits"]},
               "num_images": params["num_images"], "num_annotations": num_annotations,
               "params": params, "seconds": time.perf_counter() - start}
    logger.info("demo dataset written to %s: %s images, %s boxes in %.1f s", root,
                summary["num_images"], summary["num_annotations"], summary["seconds"])
    return summary


def ensure_demo_dataset(root: str, num_train: int = None, num_val: int = None, image_size=None,
                        seed: int = 0, splits=("train", "val"), show_progress: bool = True,
                        empty_fraction: float = None, preset: str = None) -> str:
    """Return `root`, generating the dataset first unless a complete copy with the same parameters exists."""
    params = generation_params(num_train, num_val, image_size, seed, splits, empty_fraction, preset)
    try:
        with open(os.path.join(root, MARKER_NAME)) as f:
            if json.load(f) == params:
                return root
    except (OSError, ValueError):
        pass  # missing or unreadable marker: the dataset is incomplete
    generate_demo_dataset(root, num_train, num_val, image_size, seed, splits,
                          show_progress=show_progress, empty_fraction=empty_fraction, preset=preset)
    return root


def preset_root(preset: str = None) -> str:
    """Where a preset's data lives by default: ``data/demo``, ``data/demo-sparse``, ..."""
    return "data/demo" if preset is None else f"data/demo-{preset}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes demo dataset (COCO format).")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="another kind of the same data: sparse (1-2 objects of 10-16 px per 128 px image, "
                             "about 1 foreground anchor in 1,200, COCO-like), large (24 + 8 images of 2000-3000 px "
                             "with 20-60 objects of 10-40 px); it sets the defaults below (default: the demo)")
    parser.add_argument("--root", help="output directory (default: data/demo, or data/demo-PRESET)")
    parser.add_argument("--num-train", type=int, help="images in the train split (default: 3000, or the preset's)")
    parser.add_argument("--num-val", type=int, help="images in the val split (default: 300, or the preset's)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PX",
                        help="image side, or HEIGHT WIDTH (default: 160, or the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: %(default)s)")
    parser.add_argument("--splits", nargs=2, default=["train", "val"], metavar=("TRAIN", "VAL"),
                        help="names of the two splits (default: train val)")
    parser.add_argument("--empty-fraction", type=float,
                        help="fraction of images with no objects (default: 0.05, or the preset's)")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if a complete dataset with these parameters exists")
    parser.add_argument("--quiet", action="store_true", help="hide the progress bar")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise SystemExit("--image-size takes one value (square) or two (HEIGHT WIDTH)")
    image_size = args.image_size and (args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size))
    root = args.root or preset_root(args.preset)
    try:  # the same checks the generator makes, reported as the flags' mistake
        generation_params(args.num_train, args.num_val, image_size, args.seed, args.splits, args.empty_fraction,
                          args.preset)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    build = generate_demo_dataset if args.force else ensure_demo_dataset
    try:
        build(root, num_train=args.num_train, num_val=args.num_val, image_size=image_size, seed=args.seed,
              splits=tuple(args.splits), show_progress=not args.quiet, empty_fraction=args.empty_fraction,
              preset=args.preset)
    except OSError as error:  # an unwritable --root, a full disk
        raise UserError(f"--root {root}: cannot write the dataset there: {error.strerror or error}") from error
    print(f"demo dataset ready at {root}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    exit_on_user_error(main, get_args_parser().parse_args())
