"""Convert Pascal VOC, YOLO txt or CSV annotations into the COCO layout train.py reads.

    python tools/convert_to_coco.py --format voc --input VOCdevkit/VOC2007 --output data/voc --split trainval
    python tools/convert_to_coco.py --format yolo --input my_yolo --output data/mine --split train
    python tools/convert_to_coco.py --format csv --input annotations.csv --output data/mine --split train

writes ``OUTPUT/annotations/instances_SPLIT.json`` and ``OUTPUT/SPLIT/`` (links to the
images, or copies with ``--link copy``). The formats are described in
``utils/data/formats/`` (voc.py, yolo.py, csv_rows.py). Every box is checked on the
way: a malformed file stops the conversion with the file and line; an object of an
unknown class, a box without area or an image that cannot be read is skipped with a
warning naming its file and line (``--strict`` stops instead), and the result is validated
by the same code that loads it for training (``coco_dataset``). Images without labels are
kept as negatives.
"""
import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

import coco_dataset  # noqa: E402
from utils.data.coco_annotations import parse_coco_detection  # noqa: E402
from utils.data.formats.common import ConversionError, Problems, read_class_list, to_coco  # noqa: E402
from utils.data.formats.csv_rows import read_csv  # noqa: E402
from utils.data.formats.voc import DIFFICULT_CHOICES, read_voc  # noqa: E402
from utils.data.formats.yolo import read_yolo  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.errors import exit_on_user_error  # noqa: E402
from utils.runtime.logger import setup_logging  # noqa: E402

logger = logging.getLogger("convert_to_coco")
LINK_CHOICES = ("symlink", "hardlink", "copy")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("convert_to_coco.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--format", required=True, choices=["voc", "yolo", "csv"], help="input annotation format")
    parser.add_argument("--input", required=True, help="voc: the VOC root (Annotations/, JPEGImages/); yolo: the "
                        "folder holding images/ and labels/; csv: the CSV file")
    parser.add_argument("--output", required=True, help="COCO-format root to write (train.py --data-path)")
    parser.add_argument("--split", default="train", help="split name: writes annotations/instances_SPLIT.json and "
                        "SPLIT/; yolo: reads images/SPLIT/ when it exists; voc: the ImageSets/Main/SPLIT.txt list "
                        "when it exists")
    parser.add_argument("--image-set", help="voc: the ImageSets/Main list to read instead of --split's")
    parser.add_argument("--classes", nargs="+", help="class names in order, or a file of them (one per line, or "
                        "'name,id' rows); objects of other classes are skipped. Default: yolo: classes.txt or "
                        "data.yaml; voc, csv: every name found, sorted")
    parser.add_argument("--difficult", choices=DIFFICULT_CHOICES, default="ignore", help="voc: difficult objects "
                        "become ignored regions (iscrowd, as VOC's evaluation treats them), ordinary boxes, or nothing")
    parser.add_argument("--link", choices=LINK_CHOICES, default="symlink",
                        help="how SPLIT/ gets the images: symbolic links to the originals, hard links, or copies")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing instances_SPLIT.json and links")
    parser.add_argument("--strict", action="store_true", help="stop at the first skipped object or image")
    return parser


def read_entries(args, classes, problems):
    if args.format == "voc":
        return read_voc(args.input, args.image_set or args.split, classes, args.difficult, problems,
                        image_set_required=args.image_set is not None)
    if args.format == "yolo":
        return read_yolo(args.input, args.split, classes, problems)
    return read_csv(args.input, classes, problems)


def output_file_names(paths: list) -> list:
    """Each image's path below the folder all of them share; names repeated (ignoring case) get ``_2``, ``_3``."""
    paths = [Path(os.path.abspath(path)) for path in paths]
    base = Path(os.path.commonpath([str(path.parent) for path in paths]))
    names, taken = [], set()
    for path in paths:
        relative = path.relative_to(base)
        name, count = relative.as_posix(), 1
        while name.lower() in taken:
            count += 1
            name = relative.with_name(f"{relative.stem}_{count}{relative.suffix}").as_posix()
        taken.add(name.lower())
        names.append(name)
    return names


def place_images(paths: list, names: list, image_dir: Path, mode: str, overwrite: bool) -> None:
    """Make ``image_dir/name`` for every image: a symlink to it, a hard link, or a copy."""
    for source, name in tqdm(list(zip(paths, names)), desc=f"images ({mode})", unit="img"):
        target = image_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            if target.exists() and os.path.samefile(target, source):
                continue  # already there (an earlier run, or the output is the input folder)
            if not overwrite:
                raise ConversionError(f"{target} exists and is not {source}; pass --overwrite to replace it")
            target.unlink()
        try:
            if mode == "symlink":
                os.symlink(source.resolve(), target)
            elif mode == "hardlink":
                os.link(source, target)
            else:
                shutil.copy2(source, target)
        except OSError as exc:
            raise ConversionError(f"cannot {mode} {source} to {target}: {exc.strerror or exc}"
                                  + ("; try --link symlink or --link copy" if mode == "hardlink" else "")) from None


def main(args) -> dict:
    output = Path(args.output)
    ann_path, image_dir = output / "annotations" / f"instances_{args.split}.json", output / args.split
    if ann_path.exists() and not args.overwrite:
        raise ConversionError(f"{ann_path} exists; pass --overwrite to replace it")
    problems = Problems(strict=args.strict)
    classes = read_class_list(args.classes)
    entries, class_names = read_entries(args, classes, problems)
    if not entries:
        raise ConversionError(f"no usable images in {args.input} ({problems.summary()})")
    if not class_names:
        raise ConversionError(f"{args.input}: no objects, so no class names; give them with --classes")
    paths = [entry.path for entry in entries]
    names = output_file_names(paths)
    dataset = to_coco(entries, names, class_names)
    parse_coco_detection(dataset, source=str(ann_path))  # what training will check, before writing
    place_images(paths, names, image_dir, args.link, args.overwrite)
    write_json_atomic(ann_path, dataset)
    coco_dataset.CocoDetection(image_dir, ann_path)  # the images are where training will look for them

    num_ignored = sum(a["iscrowd"] for a in dataset["annotations"])
    num_negative = sum(not entry.objects for entry in entries)
    per_class = {name: 0 for name in class_names}
    for entry in entries:
        for obj in entry.objects:
            per_class[obj.class_name] += 1
    logger.info("%d images (%d without objects), %d boxes (%d ignored regions), %d classes -> %s, %s/",
                len(entries), num_negative, len(dataset["annotations"]), num_ignored, len(class_names), ann_path,
                image_dir)
    logger.info("boxes per class: %s", ", ".join(f"{name} {count}" for name, count in per_class.items()))
    logger.info("%s", problems.summary())
    logger.info("next: python tools/check_dataset.py --data-path %s --split %s --recipe demo", output, args.split)
    return {"num_images": len(entries), "num_boxes": len(dataset["annotations"]), "num_negative": num_negative,
            "skipped": dict(problems.counts), "annotation_file": str(ann_path)}


if __name__ == "__main__":
    setup_logging(verbose=False)
    exit_on_user_error(main, get_args_parser().parse_args())
