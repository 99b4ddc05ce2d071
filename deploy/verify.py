"""ONNX Runtime against PyTorch on the same images: the same detections within tolerances.

Two runtimes round differently, so detections are compared as sets paired by score
order: the same count, scores within ``score_tolerance``, boxes within ``box_tolerance``
pixels, the same labels. Detections whose scores lie within ``score_tolerance`` of
each other may legitimately come out in either order; inside such a run of near-equal
scores each PyTorch detection is paired with the closest ONNX one.

An INT8 model is not expected to be that close: :func:`agreement` / :func:`compare_runtimes`
measure how many of the float model's best detections it finds again (same label, IoU >= 0.5)
and how far their scores moved.
"""
import numpy as np
import torch
from torchvision.ops import box_iou

from utils.data.demo_shapes import render_image

SCORE_TOLERANCE = 1e-4
BOX_TOLERANCE = 1e-2  # pixels


def _numpy(detections: dict) -> tuple:
    boxes, scores, labels = (np.asarray(detections[key].detach().cpu() if isinstance(detections[key], torch.Tensor)
                                        else detections[key]) for key in ("boxes", "scores", "labels"))
    order = np.argsort(-scores, kind="stable")
    return boxes[order].reshape(-1, 4).astype(np.float64), scores[order].astype(np.float64), labels[order]


def compare_detections(reference: dict, candidate: dict, score_tolerance: float = SCORE_TOLERANCE,
                       box_tolerance: float = BOX_TOLERANCE) -> dict:
    """Compare two detection sets (``{"boxes" [D, 4], "scores" [D], "labels" [D]}``, numpy or torch).

    Returns ``{"count": (reference D, candidate D), "score_diff", "box_diff" (largest absolute
    differences over the pairs, 0 without pairs), "labels_equal", "ok"}``.
    """
    ref_boxes, ref_scores, ref_labels = _numpy(reference)
    cand_boxes, cand_scores, cand_labels = _numpy(candidate)
    paired = min(len(ref_scores), len(cand_scores))
    score_diff = box_diff = 0.0
    labels_equal = True
    start = 0
    while start < paired:
        end = start + 1  # [start, end): a run of near-equal reference scores
        while end < paired and ref_scores[end - 1] - ref_scores[end] <= score_tolerance:
            end += 1
        unused = list(range(start, end))
        for i in range(start, end):
            distances = [np.abs(ref_boxes[i] - cand_boxes[j]).max() + (ref_labels[i] != cand_labels[j]) * 1e9
                         for j in unused]
            j = unused.pop(int(np.argmin(distances)))
            score_diff = max(score_diff, abs(ref_scores[i] - cand_scores[j]))
            box_diff = max(box_diff, float(np.abs(ref_boxes[i] - cand_boxes[j]).max()))
            labels_equal &= bool(ref_labels[i] == cand_labels[j])
        start = end
    ok = (len(ref_scores) == len(cand_scores) and labels_equal and score_diff <= score_tolerance
          and box_diff <= box_tolerance)
    return {"count": (len(ref_scores), len(cand_scores)), "score_diff": float(score_diff),
            "box_diff": float(box_diff), "labels_equal": labels_equal, "ok": ok}


def verification_images(count: int = 3, fixed_size=None, min_size: int = 800, max_size: int = 1333,
                        seed: int = 0) -> list:
    """``count`` synthetic scenes (shapes on textured backgrounds, utils.data.demo_data) as
    ``(name, ByteTensor[3, H, W])``: of ``fixed_size``, or of varied sizes and aspect
    ratios that are multiples of neither 32 nor 2, some up- and some down-scaled by the model."""
    rng = np.random.default_rng(seed)
    if fixed_size is not None:
        sizes = [tuple(fixed_size)] * count
    else:
        short = max(8, min_size)
        candidates = [(short * 3 // 4, short * 4 // 3), (short + short // 5, short * 9 // 10),
                      (short // 2, min(max_size, short * 2)), (short * 5 // 4, short * 5 // 4)]
        sizes = [tuple(s | 1 for s in candidates[i % len(candidates)]) for i in range(count)]
    images = []
    for index, (height, width) in enumerate(sizes):
        pixels = render_image(rng, height, width)[0]
        images.append((f"synthetic_{index}_{height}x{width}", torch.from_numpy(pixels).permute(2, 0, 1).contiguous()))
    return images


@torch.inference_mode()
def verify(model, detector, images: list, score_tolerance: float = SCORE_TOLERANCE,
           box_tolerance: float = BOX_TOLERANCE) -> list:
    """Run ``model`` (the PyTorch RetinaNet, eval mode) and ``detector`` (a
    :class:`deploy.ort_detector.OnnxDetector`) on ``images`` (``(name, ByteTensor[3, H, W])``).

    Returns one :func:`compare_detections` record per image, with "name" and "size" added.
    """
    records = []
    for name, image in images:
        reference = model([image])[0]
        record = compare_detections(reference, detector(image.numpy(), name=name), score_tolerance, box_tolerance)
        records.append({"name": name, "size": tuple(image.shape[1:]), **record})
    return records


TOP_K = 20  # the reference detections an INT8 model is checked on, per image
MATCH_IOU = 0.5


def agreement(reference: dict, candidate: dict, top_k: int = TOP_K, iou_threshold: float = MATCH_IOU) -> dict:
    """How many of ``reference``'s ``top_k`` best detections ``candidate`` also finds.

    For a model whose numbers legitimately differ (INT8 against float) instead of
    :func:`compare_detections`' tolerances: in decreasing score order, each reference
    detection is matched to the unmatched candidate detection of the same label with the
    highest IoU, if that IoU is at least ``iou_threshold``.

    Returns ``{"reference", "candidate" (counts; reference capped at top_k), "matched",
    "score_diffs" (|score difference| of each matched pair, a list)}``.
    """
    ref_boxes, ref_scores, ref_labels = _numpy(reference)
    cand_boxes, cand_scores, cand_labels = _numpy(candidate)
    ref_boxes, ref_scores, ref_labels = ref_boxes[:top_k], ref_scores[:top_k], ref_labels[:top_k]
    score_diffs = []
    if len(ref_scores) and len(cand_scores):
        iou = np.nan_to_num(box_iou(torch.from_numpy(ref_boxes), torch.from_numpy(cand_boxes)).numpy())
        # A box clipped to zero width has no IoU with anything, itself included: equal boxes match.
        iou[np.abs(ref_boxes[:, None] - cand_boxes[None]).max(-1) < 1e-3] = 1.0
        iou[ref_labels[:, None] != cand_labels[None, :]] = -1.0
        for i in range(len(ref_scores)):
            j = int(iou[i].argmax())
            if iou[i, j] >= iou_threshold:
                score_diffs.append(float(abs(ref_scores[i] - cand_scores[j])))
                iou[:, j] = -1.0  # each candidate detection matches once
    return {"reference": len(ref_scores), "candidate": len(cand_scores), "matched": len(score_diffs),
            "score_diffs": score_diffs}


def compare_runtimes(reference_detector, candidate_detector, images: list, top_k: int = TOP_K,
                     iou_threshold: float = MATCH_IOU) -> dict:
    """:func:`agreement` of two detectors (float and INT8 ``OnnxDetector``) on ``images``
    (``(name, ByteTensor[3, H, W])``): per-image records and the totals
    ``{"images", "records", "reference", "matched", "agreement" (matched / reference, 1 without
    reference detections), "score_diff_mean", "score_diff_max"}``."""
    records = []
    for name, image in images:
        pixels = image.numpy() if isinstance(image, torch.Tensor) else image
        record = agreement(reference_detector(pixels, name=name), candidate_detector(pixels, name=name), top_k,
                           iou_threshold)
        records.append({"name": name, **record})
    diffs = [d for record in records for d in record["score_diffs"]]
    reference = sum(r["reference"] for r in records)
    matched = sum(r["matched"] for r in records)
    return {"images": len(records), "records": records, "reference": reference, "matched": matched,
            "agreement": matched / reference if reference else 1.0,
            "score_diff_mean": float(np.mean(diffs)) if diffs else 0.0,
            "score_diff_max": float(np.max(diffs)) if diffs else 0.0, "top_k": top_k,
            "iou_threshold": iou_threshold}
