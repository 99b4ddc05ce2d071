"""A COCO annotation file (and plain JPEGs) from a few hand-written boxes, for the evaluation tests."""
import json
from pathlib import Path

from PIL import Image
from pycocotools.coco import COCO


def write_coco_split(root: Path, split: str, images, boxes, categories, image_files: bool = False) -> COCO:
    """Write ``root/annotations/instances_<split>.json`` (and JPEGs with ``image_files``); return its COCO."""
    dataset = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"id": k, "image_id": image_id, "category_id": cat_id, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0}
                        for k, (image_id, cat_id, bbox) in enumerate(boxes, start=1)],
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dataset))
    if image_files:
        (root / split).mkdir(parents=True, exist_ok=True)
        for image_id, width, height in images:
            Image.new("RGB", (width, height), (120, 80, 40)).save(root / split / f"{image_id:012d}.jpg")
    coco = COCO(str(ann_file))
    return coco
