"""COCO-format annotation files: reading, validation and conversion to arrays, without torch.

``parse_coco_detection`` validates a whole ``instances_*.json`` at once, vectorised with numpy
(COCO train2017's 860k annotations in seconds): a malformed entry raises ``DatasetError``
naming the file and the entry, a missing file ``DatasetNotFoundError`` listing the splits that
exist. Boxes come out as ``x1, y1, x2, y2`` clipped to their image; empty ones are dropped and
counted. ``coco_dataset.CocoDetection`` builds on it; the conversion and evaluation scripts call
it to check a file before they use it. ``build_coco_index`` gives pycocotools its ``COCO`` view of
a file already read, the one the dataset, the evaluation and the scoring use.
"""
import contextlib
import io
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pycocotools.coco import COCO

from utils.runtime.errors import DatasetError, DatasetNotFoundError

logger = logging.getLogger(__name__)

# Boxes thinner than this (pixels) after clipping cannot be regressed (log of ~0 width).
MIN_BOX_SIZE = 1e-3


class ParsedAnnotations(NamedTuple):
    """Validated annotation arrays; images in ascending id order, annotations grouped by image."""
    image_ids: np.ndarray     # int64 [I], ascending
    file_names: list          # [I] str
    image_sizes: np.ndarray   # float64 [I, 2] (height, width) as stated in the json
    cat_ids: list             # [K] int, ascending; label k <-> cat_ids[k]
    category_names: list      # [K] str
    ann_offsets: np.ndarray   # int64 [I + 1]: image i owns rows ann_offsets[i]:ann_offsets[i + 1]
    boxes: np.ndarray         # float32 [A, 4] x1, y1, x2, y2, clipped to the image, non-empty
    labels: np.ndarray        # int64 [A] in [0, K)
    is_crowd: np.ndarray      # bool [A]
    num_dropped: int          # annotations dropped as empty after clipping


def load_coco_json(ann_file) -> dict:
    """Read an annotation file; DatasetNotFoundError lists the splits that do exist."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DatasetNotFoundError(f"annotation file {ann_file} not found{splits_hint(ann_file.parent)}")
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: not a valid JSON file ({e})") from None
    if not isinstance(dataset, dict):
        raise DatasetError(f"{ann_file}: not a COCO detection file: the top level is a "
                         f"{type(dataset).__name__}, expected an object with 'images', 'annotations', 'categories'")
    return dataset


def build_coco_index(dataset: dict) -> COCO:
    """pycocotools' ``COCO`` over an annotation dict already in memory (the file is not read twice),
    its index built without the "creating index..." lines pycocotools prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def splits_hint(ann_dir: Path) -> str:
    if not ann_dir.is_dir():
        return f" (folder {ann_dir} does not exist either)"
    splits = sorted(p.name[len("instances_"):-len(".json")] for p in ann_dir.glob("instances_*.json"))
    return f"; splits found in {ann_dir}: {', '.join(splits)}" if splits else f"; {ann_dir} has no instances_*.json"


def parse_coco_detection(dataset: dict, source: str = "annotations") -> ParsedAnnotations:
    """Validate a COCO detection dict and convert its boxes to clipped ``x1, y1, x2, y2``.

    Args:
        dataset: the parsed json (keys "images", "annotations", "categories").
        source: name used in error messages (the annotation file path).

    Raises:
        DatasetError (a ValueError): naming ``source`` and the offending entry, for a missing key,
            non-integer or duplicate ids, an image without a positive size, an
            annotation whose image_id / category_id is unknown, or a bbox that is
            not 4 finite numbers with non-negative width and height; also when
            there are no images. Boxes outside the image are clipped, not errors.
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            problem = "is missing" if key not in dataset else f"is a {type(dataset[key]).__name__}, not a list"
            raise DatasetError(f"{source}: not a COCO detection file: top-level key '{key}' {problem} "
                             f"(found keys: {sorted(dataset)[:10]})")
    images, anns, cats = dataset["images"], dataset["annotations"], dataset["categories"]
    if not images:
        raise DatasetError(f"{source}: the dataset has no images")
    if not cats:
        raise DatasetError(f"{source}: 'categories' is empty; a detector needs at least one category")

    cat_ids = _int_column(cats, "id", "category", source)
    cat_names = [str(name) for name in _column(cats, "name", "category", source)]
    _check_unique(cat_ids, "category id", source)
    image_ids = _int_column(images, "id", "image", source)
    _check_unique(image_ids, "image id", source)
    file_names = _column(images, "file_name", "image", source)
    sizes = np.stack([_number_column(images, key, "image", source) for key in ("height", "width")], axis=1)
    bad = ~(np.isfinite(sizes).all(1) & (sizes > 0).all(1))
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(f"{source}: image id {image_ids[i]} has height={images[i]['height']!r}, "
                         f"width={images[i]['width']!r}; both must be positive numbers")

    ann_ids = _int_column(anns, "id", "annotation", source)
    _check_unique(ann_ids, "annotation id", source)
    ann_image_ids = _int_column(anns, "image_id", "annotation", source)
    ann_cat_ids = _int_column(anns, "category_id", "annotation", source)
    xywh = _bbox_column(anns, source)
    is_crowd = np.array([bool(ann.get("iscrowd", 0)) for ann in anns], dtype=bool)

    def where(i):
        return f"annotation id {ann_ids[i]} (image_id {ann_image_ids[i]})"

    bad = ~np.isfinite(xywh).all(1)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(f"{source}: {where(i)} has a non-finite bbox {anns[i]['bbox']}")
    bad = (xywh[:, 2] < 0) | (xywh[:, 3] < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DatasetError(f"{source}: {where(i)} has a bbox with negative width/height {anns[i]['bbox']}; "
                         f"COCO boxes are [x, y, width, height]")

    image_order = np.argsort(image_ids, kind="stable")
    image_ids, sizes = image_ids[image_order], sizes[image_order]
    file_names = [str(file_names[i]) for i in image_order]
    image_index = _lookup(image_ids, ann_image_ids)
    if (image_index < 0).any():
        i = int(np.argmax(image_index < 0))
        raise DatasetError(f"{source}: {where(i)} refers to image_id {ann_image_ids[i]}, which is not in 'images'")
    cat_order = np.argsort(cat_ids, kind="stable")
    cat_ids = cat_ids[cat_order]
    labels = _lookup(cat_ids, ann_cat_ids)
    if (labels < 0).any():
        i = int(np.argmax(labels < 0))
        raise DatasetError(f"{source}: {where(i)} has category_id {ann_cat_ids[i]}, which is not in "
                         f"'categories' (ids: {cat_ids[:20].tolist()}{' ...' if len(cat_ids) > 20 else ''})")

    heights, widths = sizes[image_index, 0], sizes[image_index, 1]
    with np.errstate(over="ignore"):  # x + w may overflow to inf for absurd boxes; clipping handles it
        boxes = np.stack([np.clip(xywh[:, 0], 0, widths), np.clip(xywh[:, 1], 0, heights),
                          np.clip(xywh[:, 0] + xywh[:, 2], 0, widths),
                          np.clip(xywh[:, 1] + xywh[:, 3], 0, heights)], axis=1).astype(np.float32)
    # Decided on the float32 values actually handed out, so no zero-size box slips through.
    keep = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIZE)
    num_dropped = int((~keep).sum())
    if num_dropped:
        i = int(np.argmax(~keep))
        logger.warning("%s: dropped %d of %d annotations whose box is empty after clipping to the image "
                       "(width or height <= %g px), e.g. %s bbox %s", source, num_dropped, len(anns),
                       MIN_BOX_SIZE, where(i), anns[i]["bbox"])

    image_index, boxes, labels, is_crowd = image_index[keep], boxes[keep], labels[keep], is_crowd[keep]
    order = np.argsort(image_index, kind="stable")
    counts = np.bincount(image_index, minlength=len(image_ids))
    return ParsedAnnotations(
        image_ids=image_ids, file_names=file_names, image_sizes=sizes, cat_ids=cat_ids.tolist(),
        category_names=[cat_names[i] for i in cat_order],
        ann_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=np.ascontiguousarray(boxes[order]), labels=labels[order].astype(np.int64),
        is_crowd=is_crowd[order], num_dropped=num_dropped)


def _describe(entry) -> str:
    ids = [f"{key} {entry[key]!r}" for key in ("id", "image_id") if isinstance(entry, dict) and key in entry]
    return f" ({', '.join(ids)})" if ids else ""


def _column(entries: list, key: str, kind: str, source: str) -> list:
    """``[entry[key] for entry in entries]``, or a DatasetError naming the first entry lacking it."""
    try:
        return [entry[key] for entry in entries]
    except (KeyError, TypeError, IndexError):
        pass
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"{source}: {kind} #{index} is not a JSON object: {entry!r:.80}")
        if key not in entry:
            raise DatasetError(f"{source}: {kind} #{index}{_describe(entry)} has no '{key}' "
                             f"(not COCO detection format)")
    raise AssertionError("unreachable")


def _int_column(entries: list, key: str, kind: str, source: str) -> np.ndarray:
    values = _column(entries, key, kind, source)
    array = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    if array.ndim == 1 and array.dtype.kind in "iu":
        return array.astype(np.int64)
    for index, value in enumerate(values):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not -2**63 <= value < 2**63:
            raise DatasetError(f"{source}: {kind} #{index}{_describe(entries[index])} has {key}={value!r:.80}; "
                             f"COCO ids must be integers")
    raise DatasetError(f"{source}: '{key}' of the {kind} entries are not all integers")


def _number_column(entries: list, key: str, kind: str, source: str) -> np.ndarray:
    values = _column(entries, key, kind, source)
    array = np.asarray(values)
    if array.ndim == 1 and array.dtype.kind in "iuf":
        return array.astype(np.float64)
    for index, value in enumerate(values):
        if not _is_number(value):
            raise DatasetError(f"{source}: {kind} #{index}{_describe(entries[index])} has {key}={value!r:.80}, "
                             f"expected a number")
    raise DatasetError(f"{source}: '{key}' of the {kind} entries are not all numbers")


def _bbox_column(anns: list, source: str) -> np.ndarray:
    """``float64 [A, 4]`` from the ``bbox`` lists; DatasetError naming the first malformed one."""
    values = _column(anns, "bbox", "annotation", source)
    if not values:
        return np.zeros((0, 4))
    try:
        array = np.asarray(values)
    except ValueError:  # ragged lists
        array = None
    if array is not None and array.ndim == 2 and array.shape[1] == 4 and array.dtype.kind in "iuf":
        return array.astype(np.float64)
    for index, bbox in enumerate(values):
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{source}: annotation #{index}{_describe(anns[index])} has bbox {bbox!r:.80}; "
                             f"expected [x, y, width, height] (4 numbers)")
    raise DatasetError(f"{source}: the annotation bboxes are not all lists of 4 numbers")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_unique(ids: np.ndarray, what: str, source: str):
    sorted_ids = np.sort(ids)
    duplicate = sorted_ids[1:] == sorted_ids[:-1]
    if duplicate.any():
        raise DatasetError(f"{source}: {what} {sorted_ids[1:][duplicate][0]} appears more than once")


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Index of each query in ``sorted_keys``, -1 where absent. ``int64 [len(queries)]``."""
    if len(sorted_keys) == 0:
        return np.full(len(queries), -1, dtype=np.int64)
    position = np.clip(np.searchsorted(sorted_keys, queries), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[position] == queries, position, -1).astype(np.int64)


def read_image_list(ann_file) -> dict:
    """``{file_name: image id}`` of an annotation or image-info file (``images`` with ``id`` and ``file_name``)."""
    dataset, source = load_coco_json(ann_file), str(ann_file)
    images = dataset.get("images")
    if not isinstance(images, list) or not images:
        raise DatasetError(f"{source}: no 'images' list; an image-info file lists each image's id and file_name")
    image_ids = _int_column(images, "id", "image", source)
    _check_unique(image_ids, "image id", source)
    file_names = [str(name) for name in _column(images, "file_name", "image", source)]
    seen = set()
    for name in file_names:
        if name in seen:
            raise DatasetError(f"{source}: file_name {name!r} appears more than once")
        seen.add(name)
    return dict(zip(file_names, image_ids.tolist()))
