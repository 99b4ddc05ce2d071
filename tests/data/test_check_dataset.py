"""tools/check_dataset.py as a user runs it: small objects, the suggestion it prints, drawings."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

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
