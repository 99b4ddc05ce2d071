"""engine.evaluate, evaluation.py and utils/evaluation/coco_eval.py on tiny hand-made COCO splits (CPU, seconds).

The references never run COCOeval: APs computed by hand for cases small enough to follow COCO's
101-point interpolation, and an independent few-line implementation of COCO's AP (checked
against those hand values) for a case with many IoUs.
"""
import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import coco_dataset
from engine import evaluate
from gloo_ranks import run_on_ranks
from utils.data.loaders import build_eval_loader, collate_eval
from utils.evaluation.coco_eval import METRIC_NAMES, format_metrics_table, predictions_to_coco_results, score_coco_results
from utils.runtime.atomic_io import write_json_atomic
from coco_files import write_coco_split

REPO_ROOT = Path(__file__).resolve().parents[2]

# Three images 200x150; image 3 has no annotations. Boxes are COCO xywh; their sizes
# cover COCO's small (< 32^2), medium and large (> 96^2) area ranges.
IMAGES = [(1, 200, 150), (2, 200, 150), (3, 200, 150)]
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}]
GT_BOXES = [  # (image_id, category_id, [x, y, w, h])
    (1, 3, [10.0, 10.0, 20.0, 20.0]),
    (1, 7, [50.0, 20.0, 60.0, 50.0]),
    (1, 12, [40.0, 30.0, 110.0, 100.0]),
    (2, 3, [5.0, 60.0, 40.0, 40.0]),
    (2, 7, [100.0, 10.0, 20.0, 25.0]),
    (2, 12, [60.0, 40.0, 30.0, 30.0]),
]


def as_results(boxes, score=1.0):
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": score} for i, c, b in boxes]


def iou_xywh(a, b) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def reference_precision_recall(gt_boxes, results, category_id, iou_threshold):
    """COCO's definitions for one category and IoU threshold (area "all", at most 100 detections per
    image, no crowd), without pycocotools: detections by descending score claim the unclaimed ground
    truth of their image they overlap most (IoU >= threshold), else count as false positives; precision
    is made non-increasing from the right and read at recall 0, 0.01, ..., 1 (0 past the last recall).

    Returns ``(AP, final recall)``, or None when the category has no ground truth."""
    truths = [(image_id, box) for image_id, cat, box in gt_boxes if cat == category_id]
    if not truths:
        return None
    detections = sorted((r for r in results if r["category_id"] == category_id), key=lambda r: -r["score"])
    claimed, true_positives, precisions, recalls = set(), 0, [], []
    for rank, detection in enumerate(detections, start=1):
        candidates = [(iou_xywh(detection["bbox"], box), k) for k, (image_id, box) in enumerate(truths)
                      if image_id == detection["image_id"] and k not in claimed]
        best_iou, best = max(candidates, default=(0.0, None))
        if best is not None and best_iou >= iou_threshold:
            claimed.add(best)
            true_positives += 1
        precisions.append(true_positives / rank)
        recalls.append(true_positives / len(truths))
    for k in range(len(precisions) - 2, -1, -1):
        precisions[k] = max(precisions[k], precisions[k + 1])
    sampled = [next((p for p, r in zip(precisions, recalls) if r >= point / 100), 0.0) for point in range(101)]
    return sum(sampled) / 101, (recalls[-1] if recalls else 0.0)


def reference_metrics(gt_boxes, results, category_ids) -> dict:
    """AP, AP50, AP75, AR100 and per-category AP from :func:`reference_precision_recall`."""
    thresholds = [0.5 + 0.05 * k for k in range(10)]
    table = {(c, t): reference_precision_recall(gt_boxes, results, c, t) for c in category_ids for t in thresholds}
    scored = [c for c in category_ids if table[(c, 0.5)] is not None]

    def mean(values):
        return sum(values) / len(values)

    return {"AP": mean([table[(c, t)][0] for c in scored for t in thresholds]),
            "AP50": mean([table[(c, thresholds[0])][0] for c in scored]),
            "AP75": mean([table[(c, thresholds[5])][0] for c in scored]),
            "AR100": mean([table[(c, t)][1] for c in scored for t in thresholds]),
            "per_category": {c: mean([table[(c, t)][0] for t in thresholds]) if c in scored else None
                             for c in category_ids}}


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    write_coco_split(root, "val", IMAGES, GT_BOXES, CATEGORIES)
    return root


def test_cli_results_equal_to_ground_truth_give_ap_1(coco_root, tmp_path):
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(as_results(GT_BOXES)))
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "evaluation.py", "--results", str(results_file),
                           "--data-path", str(coco_root), "--split", "val", "--output-dir", str(out_dir)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(METRIC_NAMES) <= metrics.keys()
    assert all(0.0 <= metrics[name] <= 1.0 for name in METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        assert metrics[name] == pytest.approx(1.0), name
    assert metrics["per_category"] == {"cat": 1.0, "dog": 1.0, "bird": 1.0}
    # The 12 figures and the per-category table reach the user.
    for text in ("AP50", "ARl", "category", "bird"):
        assert text in proc.stderr + proc.stdout


def test_shifted_boxes_match_an_independent_ap(coco_root):
    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    shifts = [0.0, 3.0, 7.0, 1.5, 12.0, 4.0]
    results = [{"image_id": i, "category_id": c, "bbox": [b[0] + s, b[1] - s / 2, b[2], b[3] + s],
                "score": 0.9 - 0.1 * k}
               for k, ((i, c, b), s) in enumerate(zip(GT_BOXES, shifts))]
    # Plus false positives, one of them on the image without annotations.
    results += [{"image_id": 3, "category_id": 3, "bbox": [0.0, 0.0, 50.0, 50.0], "score": 0.95},
                {"image_id": 1, "category_id": 7, "bbox": [120.0, 90.0, 30.0, 30.0], "score": 0.55}]
    untouched = copy.deepcopy(results)
    metrics, _ = score_coco_results(coco_gt, results)
    assert results == untouched  # unlike loadRes, scoring does not write into the caller's dicts
    reference = reference_metrics(GT_BOXES, results, [3, 7, 12])
    assert 0.0 < reference["AP"] < reference["AP50"] < 1.0  # a case where the comparison means something
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == pytest.approx(reference[name], abs=1e-9), name
    for category in CATEGORIES:
        assert metrics["per_category"][category["name"]] == pytest.approx(reference["per_category"][category["id"]],
                                                                         abs=1e-9)


def test_the_reference_gives_the_hand_computed_aps():
    one_found = [(1, 1, [10.0, 10.0, 50.0, 50.0]), (1, 1, [100.0, 60.0, 50.0, 50.0])]
    assert reference_metrics(one_found, as_results(one_found[:1]), [1])["AP"] == pytest.approx(51 / 101)
    with_fp = as_results(GT_BOXES, score=0.9) + [EMPTY_IMAGE_FALSE_POSITIVE]
    reference = reference_metrics(GT_BOXES, with_fp, [3, 7, 12])
    assert reference["AP"] == pytest.approx(8 / 9) and reference["per_category"][3] == pytest.approx(2 / 3)


def test_non_contiguous_category_ids_are_mapped_back(coco_root):
    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    cat_ids = [3, 7, 12]  # label k <-> cat_ids[k]
    predictions, image_ids = [], []
    for image_id, _, _ in IMAGES:
        mine = [(c, b) for i, c, b in GT_BOXES if i == image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in mine]).reshape(-1, 4)
        predictions.append({"boxes": boxes, "scores": torch.ones(len(mine)),
                            "labels": torch.tensor([cat_ids.index(c) for c, _ in mine], dtype=torch.int64)})
        image_ids.append(image_id)
    results = predictions_to_coco_results(predictions, image_ids, cat_ids)
    assert results[0] == {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 1.0}
    assert score_coco_results(coco_gt, results)[0]["AP"] == pytest.approx(1.0)
    # A mapping as a dict gives the same results; a wrong mapping scores nothing.
    assert predictions_to_coco_results(predictions, image_ids, dict(enumerate(cat_ids))) == results
    wrong = predictions_to_coco_results(predictions, image_ids, [7, 12, 3])
    assert score_coco_results(coco_gt, wrong)[0]["AP"] == 0.0
    with pytest.raises(ValueError, match="no category id"):
        predictions_to_coco_results(predictions, image_ids, cat_ids[:2])


class PredictsNothing(torch.nn.Module):
    """Stands in for a model that detects nothing, with the model's output contract."""

    def forward(self, images):
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


def test_model_that_predicts_nothing_gives_ap_0(tmp_path):
    from engine import evaluate

    root = tmp_path / "coco"
    write_coco_split(root, "val", IMAGES, GT_BOXES, CATEGORIES, image_files=True)
    dataset = coco_dataset.build_dataset(str(root), "val")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_eval)
    model = PredictsNothing().train()
    out_dir = tmp_path / "out"
    metrics = evaluate(model, loader, dataset.coco, dataset.cat_ids, "cpu", output_dir=out_dir, show_progress=False)
    assert model.training  # mode restored for the next training epoch
    assert all(metrics[name] == 0.0 for name in METRIC_NAMES)
    assert metrics["per_category"] == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    assert json.loads((out_dir / "results.json").read_text()) == []
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics


class Oracle(torch.nn.Module):
    """Returns the ground truth of each image; the test writes the image id into pixel [0, 0, 0]."""

    def forward(self, images):
        outputs = []
        for image in images:
            mine = [(c, b) for i, c, b in GT_BOXES if i == int(image[0, 0, 0])]
            outputs.append({"boxes": torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in mine]).reshape(-1, 4),
                            "scores": torch.ones(len(mine)),
                            "labels": torch.tensor([[3, 7, 12].index(c) for c, _ in mine], dtype=torch.int64)})
        return outputs


def test_evaluate_counts_images_repeated_across_ranks_once(coco_root, tmp_path, monkeypatch):
    import engine

    def image(image_id):
        pixels = torch.zeros(3, 150, 200, dtype=torch.uint8)
        pixels[0, 0, 0] = image_id
        return pixels

    # Rank 0 saw images 1-2; "rank 1" saw image 3 plus image 1 again, as DistributedSampler's padding does.
    batches = [([image(1), image(2)], [{"image_id": 1}, {"image_id": 2}])]
    other_rank = {3: [], 1: predictions_to_coco_results(Oracle()([image(1)]), [1], [3, 7, 12])}
    monkeypatch.setattr(engine.distributed, "all_gather_object", lambda obj: [obj, other_rank])
    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    metrics = engine.evaluate(Oracle(), batches, coco_gt, [3, 7, 12], "cpu", output_dir=tmp_path,
                              show_progress=False)
    assert metrics["AP"] == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(GT_BOXES)


class ColourOracle(torch.nn.Module):
    """Knows each image by its colour (red 40, 120, 200 for ids 1, 2, 3): returns its ground truth, the
    later boxes shifted by a few pixels, and a false positive, so that AP < 1 and a repeated image counts."""

    def forward(self, images):
        outputs = []
        for image in images:
            image_id = round((image[0].float().mean().item() + 40) / 80)
            mine = [(c, b) for i, c, b in GT_BOXES if i == image_id]
            boxes = [[x + 3 * k, y, x + w + 3 * k, y + h] for k, (_, (x, y, w, h)) in enumerate(mine)]
            outputs.append({"boxes": torch.tensor(boxes + [[150.0, 100, 190, 140]]).reshape(-1, 4),
                            "scores": torch.tensor([0.9 - 0.1 * k for k in range(len(mine))] + [0.3 * image_id]),
                            "labels": torch.tensor([[3, 7, 12].index(c) for c, _ in mine] + [0], dtype=torch.int64)})
        return outputs


def evaluate_split(rank: int, world_size: int, root: str) -> dict:
    """``engine.evaluate`` of the split in ``root`` on this rank's shard (batches of 1; run on each rank)."""
    dataset = coco_dataset.build_dataset(root, "val")
    loader = build_eval_loader(dataset, batch_size=1, workers=0, rank=rank, world_size=world_size)
    shard = [target["image_id"] for _, targets in loader for target in targets]
    output_dir = Path(root) / f"out_{world_size}_ranks"
    metrics = evaluate(ColourOracle(), loader, dataset.coco, dataset.cat_ids, "cpu", output_dir=output_dir,
                       show_progress=False)
    results = json.loads((output_dir / "results.json").read_text()) if rank == 0 else None
    return {"shard": shard, "metrics": metrics, "results": results}


@pytest.mark.slow
def test_two_gloo_ranks_evaluate_an_odd_split_like_one_process(tmp_path):
    """DistributedSampler pads 3 images to 4 (rank 0: images 1, 3; rank 1: 2, then 1 again); the repeat
    must be scored once, so both ranks return what one process computes, and rank 0 writes its results."""
    root = tmp_path / "coco"
    write_coco_split(root, "val", IMAGES, GT_BOXES, CATEGORIES)
    (root / "val").mkdir()
    for image_id, width, height in IMAGES:
        Image.new("RGB", (width, height), (80 * image_id - 40, 80, 40)).save(root / "val" / f"{image_id:012d}.jpg")
    one = evaluate_split(0, 1, str(root))
    assert one["shard"] == [1, 2, 3] and 0 < one["metrics"]["AP"] < 1
    assert len(one["results"]) == len(GT_BOXES) + 3
    ranks = run_on_ranks(evaluate_split, 2, tmp_path / "ranks", str(root))
    assert [rank["shard"] for rank in ranks] == [[1, 3], [2, 1]]  # image 1 is evaluated twice
    assert ranks[0]["results"] == one["results"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == one["metrics"]


# A confident false positive on image 3, which has no annotations (40 x 40: a medium-sized box).
EMPTY_IMAGE_FALSE_POSITIVE = {"image_id": 3, "category_id": 3, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.99}


def test_image_without_annotations_in_split(coco_root):
    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    assert coco_gt.getAnnIds(imgIds=[3]) == []
    perfect = as_results(GT_BOXES, score=0.9)
    assert score_coco_results(coco_gt, perfect)[0]["AP"] == pytest.approx(1.0)
    # The false positive ranks first for "cat": precision 0, 1/2, 2/3 at recall 0, 1/2, 1, made
    # non-increasing from the right: 2/3 at every recall point, at every IoU. Dog and bird stay 1.
    metrics, _ = score_coco_results(coco_gt, perfect + [EMPTY_IMAGE_FALSE_POSITIVE])
    for name in ("AP", "AP50", "AP75"):
        assert metrics[name] == pytest.approx((2 / 3 + 1 + 1) / 3), name
    assert metrics["per_category"] == pytest.approx({"cat": 2 / 3, "dog": 1.0, "bird": 1.0})
    # By area (ground truth outside the range is ignored, so is an unmatched detection outside it):
    # small: the medium false positive does not count, AP 1. Medium: cat's one medium object after the
    # false positive (1/2), dog's found (1), bird has none (left out): 3/4. Large: only bird's, 1.
    assert (metrics["APs"], metrics["APm"], metrics["APl"]) == pytest.approx((1.0, 0.75, 1.0))
    # Every object is the best detection of its image and category: recall 1 from one detection on.
    assert all(metrics[name] == pytest.approx(1.0) for name in ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl"))


def test_hand_computed_ap(tmp_path):
    # Two medium objects, one found perfectly: recall 0.5 at precision 1, nothing beyond.
    # COCO samples precision at recall 0, 0.01, ..., 1; the 51 points <= 0.5 see 1, the rest 0.
    root = tmp_path / "coco"
    boxes = [(1, 1, [10.0, 10.0, 50.0, 50.0]), (1, 1, [100.0, 60.0, 50.0, 50.0])]
    coco_gt = write_coco_split(root, "val", [(1, 200, 150)], boxes, [{"id": 1, "name": "box"}])
    metrics, _ = score_coco_results(coco_gt, as_results(boxes[:1]))
    for name in ("AP", "AP50", "AP75", "APm"):
        assert metrics[name] == pytest.approx(51 / 101), name
    assert metrics["AR100"] == pytest.approx(0.5)
    assert metrics["APs"] is None and metrics["APl"] is None  # no small / large ground truth

    # One object; a false positive outranks the true one: precision [0, 1/2] at recall [0, 1],
    # interpolated (max to the right) to 1/2 at every recall point -> AP 0.5.
    one = boxes[:1]
    coco_gt = write_coco_split(root, "val", [(1, 200, 150)], one, [{"id": 1, "name": "box"}])
    results = as_results(one, score=0.8) + [{"image_id": 1, "category_id": 1, "bbox": [120.0, 80.0, 40.0, 40.0], "score": 0.9}]
    assert score_coco_results(coco_gt, results)[0]["AP"] == pytest.approx(0.5)


def test_category_without_ground_truth_is_null_and_left_out_of_table(coco_root, tmp_path):
    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    coco_gt.dataset["categories"].append({"id": 20, "name": "zebra"})
    coco_gt.createIndex()
    metrics, _ = score_coco_results(coco_gt, as_results(GT_BOXES))
    assert metrics["per_category"]["zebra"] is None
    assert metrics["AP"] == pytest.approx(1.0)  # COCO averages over categories that have ground truth
    table = format_metrics_table(metrics)
    assert "zebra" not in table and "1 category without ground truth" in table
    write_json_atomic(tmp_path / "m.json", metrics)
    assert json.loads((tmp_path / "m.json").read_text())["per_category"]["zebra"] is None
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_plot_writes_pngs(coco_root, tmp_path):
    pytest.importorskip("matplotlib")
    from evaluation import get_args_parser, main

    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(as_results(GT_BOXES[:4], score=0.7)))
    main(get_args_parser().parse_args(["--results", str(results_file), "--data-path", str(coco_root),
                                       "--split", "val", "--plot"]))
    pngs = sorted(tmp_path.glob("*.png"))  # default output dir: the results file's folder
    assert [p.name for p in pngs] == ["pr_all_categories.png", "pr_best_worst_categories.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (tmp_path / "metrics.json").is_file()


def test_plot_without_matplotlib_only_warns(coco_root, tmp_path, monkeypatch, caplog):
    from utils.evaluation.pr_plot import plot_pr_curves

    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    _, coco_eval = score_coco_results(coco_gt, as_results(GT_BOXES))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with caplog.at_level(logging.WARNING):
        assert plot_pr_curves(coco_eval, tmp_path) == []
    assert "pip install matplotlib" in caplog.text
