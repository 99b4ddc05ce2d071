"""COCO-format detection data: validated loading, target conversion, transforms.

Layout (any dataset in COCO format, not only COCO itself)::

    ROOT/annotations/instances_{split}.json
    ROOT/{split}/<file_name of each image entry>

COCO's ``[x, y, width, height]`` boxes exist only inside this file; everything
downstream gets ``FloatTensor[N, 4]`` absolute ``x1, y1, x2, y2`` and contiguous
labels in ``[0, num_classes)`` (label ``k`` is category id ``cat_ids[k]``).

The annotation file is validated as a whole when the dataset is built (before
any GPU time is spent), vectorised with numpy so that COCO train2017's 860k
annotations take seconds: malformed entries raise a ``utils.errors.DatasetError``
(a ValueError) naming the file and the entry, a missing file or folder a
``DatasetNotFoundError`` (a FileNotFoundError), which entry scripts print as one
line; boxes reaching outside the image are clipped; boxes that are
empty after clipping are dropped with one counted warning.

Transforms (``RandomHorizontalFlip``, ``Compose``) live in ``utils/transforms.py``
and are re-exported here; multi-scale resizing is done by the model.
"""
import contextlib
import io
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from pycocotools.coco import COCO

from utils.errors import DatasetError, DatasetNotFoundError
from utils.image_io import ImageReadError, read_image
from utils.transforms import Compose, RandomHorizontalFlip  # noqa: F401  (part of this module's API)

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
        raise DatasetNotFoundError(f"annotation file {ann_file} not found{_splits_hint(ann_file.parent)}")
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: not a valid JSON file ({e})") from None
    if not isinstance(dataset, dict):
        raise DatasetError(f"{ann_file}: not a COCO detection file: the top level is a "
                         f"{type(dataset).__name__}, expected an object with 'images', 'annotations', 'categories'")
    return dataset


def _splits_hint(ann_dir: Path) -> str:
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


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset.

    Args:
        image_dir: folder holding the images (``file_name`` is relative to it).
        ann_file: COCO ``instances_*.json``.
        transforms: callable ``(image, target) -> (image, target)``, or None.
        filter_empty: drop images with no non-crowd box (detectron2's default for
            training); otherwise they stay as negatives (background-only images).
        image_info: also accept a file without ``annotations``, an image list such as COCO
            test-dev's ``image_info_test-dev2017.json`` (images + categories), to run a model on.

    ``dataset[i]`` is ``(image, target)``:
        image: ``ByteTensor[3, H, W]`` uint8 RGB (the model converts to float;
            uint8 is 4x cheaper to move between processes and devices).
        target: ``boxes`` ``FloatTensor[N, 4]`` absolute x1, y1, x2, y2 in this
            image's pixels; ``labels`` ``Int64Tensor[N]`` in ``[0, num_classes)``;
            ``crowd_boxes`` ``FloatTensor[M, 4]`` of the iscrowd=1 regions (not in
            boxes/labels: the loss only uses them to ignore anchors);
            ``image_id`` int; ``orig_size`` ``(H, W)`` of the decoded image.

    A file that cannot be decoded, or whose decoded size differs from the size in
    the annotation file (the boxes would be misplaced), raises ``ImageReadError``
    naming the file; the training loop decides whether to skip it.
    """

    def __init__(self, image_dir, ann_file, transforms=None, filter_empty: bool = False, image_info: bool = False):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        if not self.ann_file.is_file():  # checked before the (slow) json load of a big file
            raise DatasetNotFoundError(f"annotation file {ann_file} not found{_splits_hint(self.ann_file.parent)}")
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder {image_dir} not found (annotations: {ann_file})")
        dataset = load_coco_json(self.ann_file)
        if image_info and "annotations" not in dataset:
            dataset = {**dataset, "annotations": []}  # an image list without ground truth: every image is empty
        parsed = parse_coco_detection(dataset, source=str(self.ann_file))
        self.coco = COCO()
        self.coco.dataset = dataset  # reuse the parsed json instead of reading the file twice
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        self.transforms = transforms
        self._parsed = parsed
        rows = np.arange(len(parsed.image_ids))
        if filter_empty:
            owner = np.repeat(rows, np.diff(parsed.ann_offsets))  # image row of each annotation
            num_boxes = np.bincount(owner[~parsed.is_crowd], minlength=len(rows))
            rows = rows[num_boxes > 0]
            if len(rows) == 0:
                raise DatasetError(f"{ann_file}: no image has a (non-crowd) box, so filter_empty leaves nothing")
        self._rows = rows  # dataset index -> row in the parsed arrays
        self.ids = parsed.image_ids[rows].tolist()
        self.cat_ids = list(parsed.cat_ids)
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        self.category_names = list(parsed.category_names)
        self.categories = [{"id": i, "name": n} for i, n in zip(self.cat_ids, self.category_names)]
        self.num_classes = len(self.cat_ids)
        self._check_image_dir()

    def _check_image_dir(self):
        # A wrong folder shows up here rather than as a skipped image per step.
        sample = np.unique(np.linspace(0, len(self._rows) - 1, num=min(3, len(self._rows))).astype(int))
        paths = [self.image_dir / self._parsed.file_names[self._rows[i]] for i in sample]
        if not any(path.is_file() for path in paths):
            raise DatasetNotFoundError(f"none of the images checked exist, e.g. {paths[0]}: is {self.image_dir} "
                                    f"the image folder for {self.ann_file}?")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int):
        row = self._rows[index]
        path = self.image_dir / self._parsed.file_names[row]
        image = read_image(path)
        height, width = image.shape[-2:]
        expected_height, expected_width = self._parsed.image_sizes[row]
        if (height, width) != (expected_height, expected_width):
            raise ImageReadError(f"cannot use image '{path}': it decodes to {height}x{width} (HxW) but "
                                 f"{self.ann_file} says {expected_height:g}x{expected_width:g}, so its boxes "
                                 f"would be misplaced (an EXIF rotation the annotation tool ignored?)", str(path))
        start, end = self._parsed.ann_offsets[row], self._parsed.ann_offsets[row + 1]
        crowd = self._parsed.is_crowd[start:end]
        boxes = self._parsed.boxes[start:end]
        # Boolean indexing copies, so transforms can never write into the shared arrays.
        target = {"boxes": torch.from_numpy(boxes[~crowd]),
                  "labels": torch.from_numpy(self._parsed.labels[start:end][~crowd]),
                  "crowd_boxes": torch.from_numpy(boxes[crowd]),
                  "image_id": int(self._parsed.image_ids[row]),
                  "orig_size": (int(height), int(width))}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def aspect_ratios(self) -> list:
        """Width / height of every image in dataset order, from the annotation file (no decoding)."""
        sizes = self._parsed.image_sizes[self._rows]
        return (sizes[:, 1] / sizes[:, 0]).tolist()

    def box_arrays(self) -> dict:
        """Every non-crowd box of the dataset at once, from the annotation file (no decoding):
        ``boxes`` float32 ``[G, 4]`` xyxy, ``labels`` int64 ``[G]``, ``image_index`` int64 ``[G]``
        (dataset index of the box's image), ``image_sizes`` float64 ``[len(self), 2]`` (height, width);
        ``crowd_labels`` int64 ``[C]``: the label of each crowd (ignored) region."""
        offsets = self._parsed.ann_offsets
        counts = offsets[self._rows + 1] - offsets[self._rows]
        rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in self._rows]) if len(self._rows) \
            else np.zeros(0, dtype=np.int64)
        image_index = np.repeat(np.arange(len(self._rows)), counts)
        crowd = self._parsed.is_crowd[rows]
        labels = self._parsed.labels[rows]
        return {"boxes": self._parsed.boxes[rows][~crowd], "labels": labels[~crowd],
                "image_index": image_index[~crowd], "image_sizes": self._parsed.image_sizes[self._rows],
                "crowd_labels": labels[crowd]}


def collate_fn(batch):
    """``[(image, target), ...] -> (list of images, list of targets)``; sizes stay as they are."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_dataset(data_path, split: str, train: bool = False, hflip_prob: float = 0.5,
                  filter_empty: bool = False) -> CocoDetection:
    """``CocoDetection`` for ``data_path/annotations/instances_{split}.json`` + ``data_path/{split}``.

    Training adds a horizontal flip (``hflip_prob``) and honours ``filter_empty``;
    evaluation never filters, since every image counts for AP.
    """
    root = Path(data_path)
    transforms = Compose([RandomHorizontalFlip(hflip_prob)]) if train and hflip_prob > 0 else None
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}.json", transforms=transforms,
                         filter_empty=train and filter_empty)
