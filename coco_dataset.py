"""COCO-format detection data: the dataset of training and evaluation, target conversion, transforms.

Layout (any dataset in COCO format, not only COCO itself)::

    ROOT/annotations/instances_{split}.json
    ROOT/{split}/<file_name of each image entry>

COCO's ``[x, y, width, height]`` boxes exist only inside this file; everything
downstream gets ``FloatTensor[N, 4]`` absolute ``x1, y1, x2, y2`` and contiguous
labels in ``[0, num_classes)`` (label ``k`` is category id ``cat_ids[k]``).

The annotation file is validated as a whole when the dataset is built (before
any GPU time is spent) by ``utils/data/coco_annotations.py``, vectorised with numpy so that
COCO train2017's 860k annotations take seconds: malformed entries raise a ``utils.runtime.errors.DatasetError``
(a ValueError) naming the file and the entry, a missing file or folder a
``DatasetNotFoundError`` (a FileNotFoundError), which entry scripts print as one
line; boxes reaching outside the image are clipped; boxes that are
empty after clipping are dropped with one counted warning.

Transforms (``RandomHorizontalFlip``, ``Compose``) live in ``utils/data/transforms.py``
and are re-exported here; multi-scale resizing is done by the model; crop training's
windows of large images come from ``utils/data/crops.py``. Samples are batched
into lists by ``utils.data.loaders.collate_eval`` (or ``collate_train`` in training).
"""
import logging
from pathlib import Path

import numpy as np
import torch

from utils.data.coco_annotations import build_coco_index, load_coco_json, parse_coco_detection, splits_hint
from utils.data.crops import CropDataset, CropSettings
from utils.data.image_io import ImageReadError, read_image
from utils.data.transforms import Compose, RandomHorizontalFlip, build_train_transforms  # noqa: F401  (API)
from utils.runtime.errors import DatasetError, DatasetNotFoundError

logger = logging.getLogger(__name__)

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
            raise DatasetNotFoundError(f"annotation file {ann_file} not found{splits_hint(self.ann_file.parent)}")
        if not self.image_dir.is_dir():
            raise DatasetNotFoundError(f"image folder {image_dir} not found (annotations: {ann_file})")
        dataset = load_coco_json(self.ann_file)
        if image_info and "annotations" not in dataset:
            dataset = {**dataset, "annotations": []}  # an image list without ground truth: every image is empty
        parsed = parse_coco_detection(dataset, source=str(self.ann_file))
        self.coco = build_coco_index(dataset)

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


def build_dataset(data_path, split: str, train: bool = False, hflip_prob: float = 0.5,
                  filter_empty: bool = False, *, vflip_prob: float = 0.0, rot90_prob: float = 0.0,
                  colour_jitter: float = 0.0, crop: CropSettings = None, crop_cache_bytes: int = 0):
    """``CocoDetection`` for ``data_path/annotations/instances_{split}.json`` + ``data_path/{split}``.

    Training adds a horizontal flip (``hflip_prob``), and a vertical flip, 90-degree rotations and
    colour jitter when asked (``utils.data.transforms.build_train_transforms``), and honours
    ``filter_empty``; with ``crop`` (``utils.data.crops.CropSettings``) it serves random windows
    of the images (a ``CropDataset``, the augmentations applied to each window, up to
    ``crop_cache_bytes`` of decoded images kept between windows per process). Evaluation never
    filters, crops or augments, since every whole image counts for AP.
    """
    root = Path(data_path)
    transforms = build_train_transforms(hflip_prob, vflip_prob=vflip_prob, rot90_prob=rot90_prob,
                                        colour_jitter=colour_jitter) if train else None
    image_dir, ann_file = root / split, root / "annotations" / f"instances_{split}.json"
    if train and crop is not None:
        return CropDataset(CocoDetection(image_dir, ann_file, filter_empty=filter_empty), crop, transforms=transforms,
                           cache_bytes=crop_cache_bytes)
    return CocoDetection(image_dir, ann_file, transforms=transforms, filter_empty=train and filter_empty)
