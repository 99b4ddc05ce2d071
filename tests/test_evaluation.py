"""engine.evaluate, evaluation.py and utils/evaluation/coco_eval.py on tiny hand-made COCO splits (CPU, seconds).

The reference is pycocotools' COCOeval driven directly (``loadRes`` + ``evaluate``),
plus hand-computed APs for cases small enough to follow COCO's 101-point interpolation.
"""
import argparse
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
from pycocotools.cocoeval import COCOeval

import coco_dataset
from utils.data.loaders import collate_eval
from utils.runtime.atomic_io import write_json_atomic
from utils.evaluation.coco_eval import METRIC_NAMES, format_metrics_table, predictions_to_coco_results, score_coco_results

REPO_ROOT = Path(__file__).resolve().parents[1]

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


def as_results(boxes, score=1.0):
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": score} for i, c, b in boxes]


def reference_stats(coco_gt: COCO, results, cat_ids=None):
    """COCOeval run the documented way, on a deep copy (loadRes writes into the dicts)."""
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), iouType="bbox")
    if cat_ids is not None:
        coco_eval.params.catIds = cat_ids
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


def assert_same_as_cocoeval(metrics, stats):
    for name, value in zip(METRIC_NAMES, stats):
        if value < 0:
            assert metrics[name] is None, name
        else:
            assert metrics[name] == pytest.approx(value, abs=1e-12), name


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


def test_shifted_boxes_match_cocoeval(coco_root):
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
    stats = reference_stats(coco_gt, results)
    assert 0.0 < stats[0] < 1.0  # a case where the comparison means something
    assert_same_as_cocoeval(metrics, stats)
    for category in CATEGORIES:
        single = reference_stats(coco_gt, results, cat_ids=[category["id"]])
        assert metrics["per_category"][category["name"]] == pytest.approx(single[0], abs=1e-12)


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


def test_image_without_annotations_in_split(coco_root):
    coco_gt = COCO(str(coco_root / "annotations" / "instances_val.json"))
    assert coco_gt.getAnnIds(imgIds=[3]) == []
    perfect = as_results(GT_BOXES, score=0.9)
    assert score_coco_results(coco_gt, perfect)[0]["AP"] == pytest.approx(1.0)
    # A confident detection on the empty image is a false positive ranked first.
    with_fp = perfect + [{"image_id": 3, "category_id": 3, "bbox": [0.0, 0.0, 40.0, 40.0], "score": 0.99}]
    metrics, _ = score_coco_results(coco_gt, with_fp)
    assert metrics["AP"] < 1.0
    assert_same_as_cocoeval(metrics, reference_stats(coco_gt, with_fp))


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
