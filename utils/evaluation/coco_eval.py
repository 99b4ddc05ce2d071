"""COCO bbox scoring: model outputs -> COCO results list -> the 12 COCO figures.

This is the COCO boundary of the repository: inside the model boxes are absolute
``x1, y1, x2, y2`` with contiguous labels ``[0, K)``; here they become COCO
``x, y, w, h`` with the dataset's own (possibly non-contiguous) category ids,
and pycocotools' ``COCOeval`` does the scoring so the numbers are the ones
papers report.

Conventions of the returned metrics:

- the 12 figures use the keys of ``METRIC_NAMES`` and are fractions in ``[0, 1]``;
- ``COCOeval`` reports -1 for a figure with no ground truth at all (e.g. ``APs``
  when the split has no small objects, or a category absent from the split);
  we report those as ``None`` (``null`` in JSON) so they are never averaged as
  if they were scores.
"""
import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.boxes.box_ops import box_xyxy_to_xywh
from utils.data.coco_annotations import build_coco_index
from utils.runtime.atomic_io import write_json_atomic  # noqa: F401 - re-exported for callers

# Order of ``COCOeval.stats``, with the description summarize() prints beside each.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRIC_DESCRIPTIONS = (
    "AP @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AP @[IoU=0.50      | area=   all | maxDets=100]",
    "AP @[IoU=0.75      | area=   all | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area= large | maxDets=100]",
)


def predictions_to_coco_results(predictions: Sequence[dict], image_ids: Sequence[int],
                                label_to_cat_id) -> list[dict]:
    """Model outputs -> COCO results list (``loadRes`` format).

    Args:
        predictions: one dict per image with ``boxes`` FloatTensor[N, 4] absolute
            x1y1x2y2 in the original image's pixels, ``scores`` FloatTensor[N] and
            ``labels`` Int64Tensor[N] in ``[0, K)``.
        image_ids: the COCO image id of each prediction, same length.
        label_to_cat_id: label k -> dataset category id; a sequence (index k) or a mapping.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``. Boxes are
        rounded to 1/100 pixel: finer digits change no IoU that matters and
        make ``results.json`` much larger.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
    if isinstance(label_to_cat_id, Mapping):
        num_labels = max(label_to_cat_id, default=-1) + 1
        lookup = [label_to_cat_id.get(k) for k in range(num_labels)]
    else:
        lookup = list(label_to_cat_id)
    results = []
    for prediction, image_id in zip(predictions, image_ids):
        boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float32).reshape(-1, 4)
        scores = torch.as_tensor(prediction["scores"], dtype=torch.float32).reshape(-1)
        labels = torch.as_tensor(prediction["labels"], dtype=torch.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                             f"{len(labels)} labels; they must match")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(lookup)
                            or any(lookup[k] is None for k in labels.unique().tolist())):
            raise ValueError(f"image {image_id}: label(s) {sorted(set(labels.tolist()))} have no "
                             f"category id (the mapping covers {len(lookup)} labels)")
        # One .tolist() per image: per-element tensor indexing would dominate on 100 boxes/image.
        xywh = box_xyxy_to_xywh(boxes).tolist()
        for box, score, label in zip(xywh, scores.tolist(), labels.tolist()):
            results.append({
                "image_id": int(image_id),
                "category_id": int(lookup[label]),
                "bbox": [round(v, 2) for v in box],
                "score": score,
            })
    return results


def _detections_as_coco(coco_gt: COCO, results: Sequence[dict]) -> COCO:
    """A detections ``COCO`` object for ``COCOeval``, built without ``loadRes``.

    ``loadRes`` crashes on an empty list (it reads ``anns[0]``) and writes
    ``segmentation``/``area``/``id`` into the caller's dicts; building the index
    ourselves handles "the model found nothing" with the same code path and
    leaves ``results`` untouched. The fields are the ones ``loadRes`` adds for bbox.
    """
    gt_image_ids = set(coco_gt.getImgIds())
    gt_cat_ids = set(coco_gt.getCatIds())
    annotations = []
    for det_id, result in enumerate(results, start=1):
        missing = {"image_id", "category_id", "bbox", "score"} - result.keys()
        if missing:
            raise ValueError(f"result #{det_id} lacks {sorted(missing)}: {result}")
        if result["image_id"] not in gt_image_ids:
            raise ValueError(f"result #{det_id} has image_id {result['image_id']}, which is not "
                             "in the ground truth; wrong split or annotation file?")
        if result["category_id"] not in gt_cat_ids:
            raise ValueError(f"result #{det_id} has category_id {result['category_id']}, not one of "
                             f"the ground truth's {sorted(gt_cat_ids)}; wrong label -> id mapping?")
        x, y, w, h = result["bbox"]
        annotations.append({"id": det_id, "image_id": result["image_id"],
                            "category_id": result["category_id"], "bbox": [x, y, w, h],
                            "score": result["score"], "area": w * h, "iscrowd": 0})
    return build_coco_index({"images": coco_gt.dataset["images"],
                             "categories": coco_gt.dataset.get("categories", []), "annotations": annotations})


def _none_if_absent(value: float):
    """COCOeval's -1 ("no ground truth to score against") -> None."""
    return None if value < 0 else float(value)


def per_category_metrics(coco_eval: COCOeval, category_names: Mapping[int, str]) -> list[dict]:
    """``[{"name", "id", "AP", "AP50"}]`` per category, read from ``coco_eval.eval["precision"]``.

    ``precision`` is ``[T iou thresholds, R recall points, K categories, A areas, M maxDets]``
    with -1 where a category has no ground truth; we take area "all" and maxDets=100,
    the setting of the headline AP.
    """
    precision = coco_eval.eval["precision"]
    iou_50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
    rows = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        curves = precision[:, :, k, 0, -1]  # [T, R]
        valid = curves[curves > -1]
        at_50 = curves[iou_50][curves[iou_50] > -1]
        rows.append({"name": category_names.get(cat_id, str(cat_id)), "id": int(cat_id),
                     "AP": float(valid.mean()) if valid.size else None,
                     "AP50": float(at_50.mean()) if at_50.size else None})
    return rows


def score_coco_results(coco_gt: COCO, results: Sequence[dict], category_names: Mapping[int, str] = None,
                       image_ids: Sequence[int] = None):
    """Score a COCO results list against ``coco_gt`` with ``COCOeval`` (bbox).

    Args:
        coco_gt: ground truth of the split.
        results: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``; may be empty
            (every figure with ground truth is then 0).
        category_names: category id -> name for ``per_category``; defaults to the ground truth's names.
        image_ids: restrict scoring to these images (e.g. the part of the split that was
            evaluated); default: every image of ``coco_gt``, including those without annotations.

    Returns:
        ``(metrics, coco_eval)``: metrics has the 12 ``METRIC_NAMES`` keys (fraction or None,
        see the module docstring) and ``"per_category": {name: AP or None}``; ``coco_eval`` is
        the evaluated ``COCOeval`` (``.eval["precision"]`` feeds the PR curves).
    """
    if category_names is None:
        category_names = {cat["id"]: cat["name"] for cat in coco_gt.loadCats(coco_gt.getCatIds())}
    coco_dt = _detections_as_coco(coco_gt, results)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(set(int(i) for i in image_ids))
    # COCOeval prints progress and its own table; format_metrics_table shows the same
    # 12 figures next to the per-category table, so its prints would only repeat them.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {name: _none_if_absent(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}
    metrics["per_category"] = {row["name"]: row["AP"] for row in per_category_metrics(coco_eval, category_names)}
    return metrics, coco_eval


def _fmt(value) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


def format_metrics_table(metrics: Mapping, per_category_rows: Sequence[dict] = None) -> str:
    """The 12 COCO figures in COCOeval's layout, then one line per category.

    ``per_category_rows`` (from :func:`per_category_metrics`) adds the id and AP50 columns;
    without it the table uses ``metrics["per_category"]`` (name and AP only). Categories
    without ground truth in the split (AP None) are left out and counted in a footnote.
    """
    lines = [f"{name:>6}  {desc}  {_fmt(metrics.get(name))}" for name, desc in zip(METRIC_NAMES, METRIC_DESCRIPTIONS)]
    if per_category_rows is None:
        per_category_rows = [{"name": name, "id": None, "AP": ap, "AP50": None}
                             for name, ap in metrics.get("per_category", {}).items()]
    scored = [row for row in per_category_rows if row["AP"] is not None]
    if scored:
        width = max(8, *(len(row["name"]) for row in scored))
        lines += ["", f"{'category':<{width}}  {'id':>5}  {'AP':>6}  {'AP50':>6}"]
        for row in scored:
            cat_id = "" if row["id"] is None else row["id"]
            lines.append(f"{row['name']:<{width}}  {cat_id:>5}  {_fmt(row['AP'])}  {_fmt(row['AP50'])}")
    skipped = len(per_category_rows) - len(scored)
    if skipped:
        lines.append(f"({skipped} categor{'y' if skipped == 1 else 'ies'} without ground truth in this split not shown)")
    return "\n".join(lines)
