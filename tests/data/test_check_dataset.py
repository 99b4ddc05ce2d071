"""tools/check_dataset.py as a user runs it: small objects, the suggestion it prints, drawings."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_small_object_dataset(root, num_images=6, image_size=800, seed=0):
    """COCO-format split 'train': 10-14 px boxes on ``image_size`` px images, two classes."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        Image.new("RGB", (image_size, image_size), (90, 120, 150)).save(root / "train" / f"{image_id}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": image_size, "height": image_size})
        for _ in range(10):
            w, h = rng.integers(10, 15, 2)
            x, y = rng.uniform(0, image_size - 20, 2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, 3)), "bbox": [float(x), float(y), int(w), int(h)],
                                "area": int(w * h), "iscrowd": 0})
    categories = [{"id": 1, "name": "dot"}, {"id": 2, "name": "speck"}]
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def write_large_image_dataset(root, seed=0):
    """COCO-format split 'train': four 1500-2500 px images, each with 40 drawn 12-30 px rectangles."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, (width, height) in enumerate([(2000, 1500), (2200, 2500), (1800, 1800), (2500, 2000)], start=1):
        image = Image.new("RGB", (width, height), (90, 120, 150))
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            w, h = (int(v) for v in rng.integers(12, 31, 2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(200, 60, 40))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        image.save(root / "train" / f"{image_id}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "car"}]}))
    return root


def check(data, tmp_path, *flags, name="report"):
    report_path = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_dataset.py"), "--data-path",
                             str(data), "--split", "train", "--json", str(report_path), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(report_path.read_text()), result.stdout


@pytest.mark.slow  # several processes, seconds each: out of the edit-test loop
def test_small_objects_low_coverage_with_default_anchors_high_with_the_suggestion(tmp_path):
    data = write_small_object_dataset(tmp_path / "small")
    report, stdout = check(data, tmp_path)  # the coco recipe's anchors (32..512 px) at 800 px
    assert report["num_boxes"] == 60 and report["num_images"] == 6
    assert report["coverage"] < 0.1, stdout
    assert report["suggestion"] is not None and "suggested: " in stdout
    flags = report["suggestion"]["flags"]
    assert "--anchor-base-sizes" in flags and " ".join(flags) in stdout
    rechecked, stdout = check(data, tmp_path, *flags, name="suggested")
    assert rechecked["coverage"] >= 0.9, stdout
    assert rechecked["coverage"] == pytest.approx(report["suggestion"]["coverage"], abs=1e-6)
    assert rechecked["suggestion"] is None and "coverage is good" in stdout
    assert sum(c["boxes"] for c in rechecked["classes"]) == 60


def test_draw_writes_images_and_counts_match_the_annotations(tmp_path):
    from utils.data.demo_data import generate_demo_dataset
    generate_demo_dataset(tmp_path / "demo", num_train=8, num_val=2, image_size=64, seed=3, show_progress=False)
    report, stdout = check(tmp_path / "demo", tmp_path, "--recipe", "demo", "--draw", "3", "--draw-dir",
                           str(tmp_path / "drawn"))
    dataset = json.loads((tmp_path / "demo" / "annotations" / "instances_train.json").read_text())
    assert report["num_boxes"] == len(dataset["annotations"])
    assert report["num_images"] == 8
    assert report["num_images_without_boxes"] == 8 - len({a["image_id"] for a in dataset["annotations"]})
    drawn = sorted(os.listdir(tmp_path / "drawn"))
    assert len(drawn) == 3
    assert Image.open(tmp_path / "drawn" / drawn[0]).size == (64, 64)


def test_small_objects_in_large_images_get_crop_flags_that_cover_them(tmp_path):
    data = write_large_image_dataset(tmp_path / "large")
    report, stdout = check(data, tmp_path, "--recipe", "demo")  # whole images at 128 px: objects of 1-2 px
    assert report["num_boxes"] == 160 and report["training"] == "whole images"
    assert report["coverage"] < 0.1, stdout
    assert report["affordable_whole_image_coverage"] < 0.9  # at longer side 1333 px they are still 8-20 px
    crops = report["crop_suggestion"]
    assert crops is not None and crops["coverage"] >= 0.9, stdout
    assert crops["flags"][:2] == ["--crop-size", str(crops["crop_size"])] and "--crop-scale" in crops["flags"]
    assert f"suggested: {' '.join(crops['flags'])}" in stdout
    assert f"{crops['coverage']:.1%}" in stdout and f"crops reach {crops['coverage']:.1%}" in crops["line"]
    assert f"tiles by default, in {crops['tile_window']} px windows" in stdout
    assert crops["tile_window"] == round(crops["crop_size"] / crops["crop_scale"])
    assert 0 < crops["memory_gib_per_step"] < crops["whole_image_memory_gib_per_step"]
    assert report["crop_coverage"]["crop_scale"] == 1.0


@pytest.mark.slow  # a second process
def test_the_suggested_crop_flags_give_the_coverage_they_promise(tmp_path):
    data = write_large_image_dataset(tmp_path / "large")
    report, _ = check(data, tmp_path, "--recipe", "demo")
    flags = report["crop_suggestion"]["flags"]
    rechecked, stdout = check(data, tmp_path, "--recipe", "demo", *flags, name="crops")
    assert rechecked["training"] == "crops" and "coverage is good" in stdout
    assert rechecked["coverage"] == pytest.approx(report["crop_suggestion"]["coverage"], abs=1e-6)
    assert rechecked["crop_suggestion"] is None
