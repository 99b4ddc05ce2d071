"""COCO results for images without ground truth: evaluation.py --results-only, inference.py --coco-results.

The reference is pycocotools: ``COCO(image_info).loadRes(results.json)`` must accept the file,
as the COCO evaluation server does for test-dev.
"""
import contextlib
import io
import json

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import evaluation
import inference
from model import build_retinanet
from utils.evaluation.coco_results import CocoResultsWriter, ResultsFileError, image_ids_for_files, read_results_file
from utils.runtime.checkpoint import save_checkpoint
from utils.runtime.errors import UserError

CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]  # ids non-contiguous, not sorted
IMAGE_IDS = [139, 285, 632]  # like COCO's: neither 0-based nor contiguous


@pytest.fixture(scope="module")
def test_dev(tmp_path_factory):
    """COCO's test-dev layout: annotations/image_info_test-dev2017.json (no "annotations" key) + test2017/."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "test2017").mkdir()
    generator = torch.Generator().manual_seed(0)
    images = []
    for image_id in IMAGE_IDS:
        file_name = f"{image_id:012d}.jpg"
        pixels = torch.randint(0, 256, (48, 64, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "test2017" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": 64, "height": 48, "license": 1})
    info = {"info": {"description": "test"}, "images": images, "categories": CATEGORIES, "licenses": []}
    (root / "annotations" / "image_info_test-dev2017.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained model whose classifier bias is 0: every anchor scores ~0.5, so it detects plenty."""
    model = build_retinanet(num_classes=2, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64,
                            max_size=64, detections_per_img=20)
    with torch.no_grad():
        model.head.cls_logits.bias.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    categories = sorted(CATEGORIES, key=lambda c: c["id"])  # label k -> category id, as train.py saves them
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": categories}, str(path))
    return path


def load_res(info_file, results_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(info_file)).loadRes(str(results_file))


def test_results_only_on_test_dev_is_accepted_by_loadres(test_dev, checkpoint, tmp_path):
    args = evaluation.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--results-only", "--data-path", str(test_dev), "--split", "test-dev2017",
        "--image-dir", str(test_dev / "test2017"), "--output-dir", str(tmp_path), "--workers", "0",
        "--device", "cpu"])
    summary = evaluation.main(args)
    assert summary["num_images"] == 3 and summary["num_detections"] == 3 * 20
    assert not (tmp_path / "metrics.json").exists()  # nothing to score against
    info_file = test_dev / "annotations" / "image_info_test-dev2017.json"
    results = json.loads((tmp_path / "results.json").read_text())
    coco_dt = load_res(info_file, tmp_path / "results.json")
    assert sorted(coco_dt.getImgIds()) == IMAGE_IDS and len(coco_dt.getAnnIds()) == len(results) == 60
    assert {r["image_id"] for r in results} == set(IMAGE_IDS)
    assert {r["category_id"] for r in results} <= {18, 3}
    for result in results:  # x, y, w, h inside the 64 x 48 images
        x, y, w, h = result["bbox"]
        assert -0.01 <= x and -0.01 <= y and w >= 0 and h >= 0 and x + w <= 64.01 and y + h <= 48.01
    read_results_file(tmp_path / "results.json", IMAGE_IDS, [18, 3])  # our own reader agrees

    # inference.py on the same folder writes the same format, ids from the image-info file.
    out = tmp_path / "inference"
    inference.main(inference.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--input", str(test_dev / "test2017"), "--output-dir", str(out),
        "--coco-results", str(out / "coco_results.json"), "--image-info", str(info_file), "--workers", "0",
        "--device", "cpu", "--score-threshold", "0.9"]))
    from_inference = json.loads((out / "coco_results.json").read_text())
    load_res(info_file, out / "coco_results.json")
    assert len(from_inference) == 60  # every detection the model outputs, not only those >= --score-threshold
    for image_id in IMAGE_IDS:  # the same model on the same images: the same detections
        ours = sorted((r["score"], r["category_id"]) for r in from_inference if r["image_id"] == image_id)
        theirs = sorted((r["score"], r["category_id"]) for r in results if r["image_id"] == image_id)
        assert [c for _, c in ours] == [c for _, c in theirs]
        assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=1e-4)


def test_results_only_finds_image_info_by_coco_name_and_rejects_results(test_dev, checkpoint, tmp_path):
    parser = evaluation.get_args_parser()
    with pytest.raises(UserError, match="--results-only runs a model"):
        evaluation.main(parser.parse_args(["--results", "r.json", "--results-only"]))
    # Without --image-dir the split folder is <data-path>/<split>, which COCO test-dev does not have.
    with pytest.raises(UserError, match=r"image folder .*test-dev2017 not found \(annotations: .*image_info_test-dev"):
        evaluation.main(parser.parse_args(["--checkpoint", str(checkpoint), "--results-only", "--data-path",
                                           str(test_dev), "--split", "test-dev2017", "--device", "cpu"]))


def test_image_ids_for_files():
    listed = {"000000000139.jpg": 139, "val2017/000000000285.jpg": 285}
    paths = ["/data/test2017/000000000139.jpg", "/data/coco/val2017/000000000285.jpg"]
    assert image_ids_for_files(paths, listed) == [139, 285]
    assert image_ids_for_files(paths) == [1, 2]
    with pytest.raises(UserError, match=r"/x/other\.jpg is not listed in info\.json"):
        image_ids_for_files(["/x/other.jpg"], listed, "info.json")


def test_writer_maps_labels_to_dataset_ids_and_xywh(tmp_path):
    writer = CocoResultsWriter(tmp_path / "r.json", ["a.jpg", "b.jpg"])
    categories = [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    writer.add(1, {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.75]),
                   "labels": torch.tensor([1])}, categories)
    writer.add(0, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
               categories)
    assert json.loads(writer.write().read_text()) == [
        {"image_id": 2, "category_id": 18, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.75}]
    assert writer.num_images == 2


def test_read_results_file_checks_every_entry(tmp_path):
    path = tmp_path / "r.json"
    good = {"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5}
    for entry, message in [({**good, "score": float("nan")}, "has score nan"),
                           ({**good, "bbox": [0, 0, -1, 1]}, r"has bbox \[0, 0, -1, 1\] with a negative width"),
                           ({**good, "category_id": True}, "has category_id=True; COCO ids are integers"),
                           ([1, 2], "is not a JSON object")]:
        path.write_text(json.dumps([good, entry]))
        with pytest.raises(ResultsFileError, match=r"r\.json: result #1 " + message):
            read_results_file(path)
    path.write_text(json.dumps([good]))
    assert read_results_file(path, [1], [2]) == [good]
