"""inference.py and utils/visual/visualize.py end to end on a tiny untrained model (CPU, seconds).

The model is a ResNet-18 RetinaNet with 32 FPN channels at 64-96 px; prior_prob=0.5
makes every anchor score about 0.5, so the untrained model has detections to write.
"""
import json
import logging
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from model import build_retinanet
from utils.data.inputs import list_images, make_output_dir, output_names
from utils.runtime.checkpoint import save_checkpoint
from utils.runtime.errors import InferenceError
from utils.visual import visualize

REPO_ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]
# name -> size (width, height) of the image as displayed, i.e. after EXIF orientation
VALID_IMAGES = {"photo.jpg": (96, 64), "alpha.png": (80, 60), "gray.bmp": (70, 50), "rotated.jpg": (80, 40)}


def tiny_model():
    return build_retinanet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64,
                           max_size=96, prior_prob=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                     "args": {}}, str(path))
    return path


def noise(height, width, channels, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """The four valid images of VALID_IMAGES, a truncated JPEG and a text file."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(noise(64, 96, 3)).save(folder / "photo.jpg", quality=90)
    rgba = noise(60, 80, 4, seed=1)
    rgba[:30, :, 3] = 0  # half transparent: composited on white by read_image
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(noise(50, 70, 1, seed=2), "L").save(folder / "gray.bmp")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: displayed rotated 90 degrees clockwise
    Image.fromarray(noise(80, 40, 3, seed=3)).save(folder / "rotated.jpg", exif=exif)  # stored 40 wide x 80 high
    data = (folder / "photo.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[:len(data) // 3])
    (folder / "notes.txt").write_text("not an image; ignored inside a folder")
    return folder


def run_main(*argv):
    return inference.main(inference.get_args_parser().parse_args([str(a) for a in argv]))


def load_records(output_dir) -> dict:
    return {record["file_name"]: record for record in json.loads((Path(output_dir) / "detections.json").read_text())}


def check_records(records: dict, expected_sizes: dict) -> int:
    """Every record has its displayed size, boxes inside it and known categories; returns the detection count."""
    assert set(records) == set(expected_sizes)
    names = {c["id"]: c["name"] for c in CATEGORIES}
    count = 0
    for file_name, record in records.items():
        assert (record["width"], record["height"]) == expected_sizes[file_name]
        assert Path(record["image_path"]).name == file_name and Path(record["image_path"]).is_absolute()
        for detection in record["detections"]:
            x1, y1, x2, y2 = detection["box"]
            assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
            assert names[detection["category_id"]] == detection["category_name"]
            assert 0.3 <= detection["score"] <= 1
        count += len(record["detections"])
    return count


@pytest.mark.slow  # several processes, seconds each: out of the edit-test loop
def test_cli_folder_with_corrupt_file(checkpoint, image_dir, tmp_path):
    output_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "inference.py", "--checkpoint", str(checkpoint), "--input", str(image_dir),
         "--output-dir", str(output_dir), "--score-threshold", "0.3", "--device", "cpu", "--workers", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "corrupt.jpg" in output and "corrupt or truncated" in output
    assert "notes.txt" not in output  # a non-image file in a folder is not an input
    assert "images/s" in output and "4 images" in output and "1 skipped" in output

    records = load_records(output_dir)
    assert check_records(records, VALID_IMAGES) > 0, "prior_prob=0.5 should give detections above 0.3"
    for file_name, (width, height) in VALID_IMAGES.items():
        drawn = output_dir / records[file_name]["output_file"]
        assert drawn.suffix == ".jpg"
        with Image.open(drawn) as image:
            assert image.size == (width, height)
    assert not (output_dir / "corrupt.jpg").exists()


def run_cli_in_process(monkeypatch, *argv):
    """``python inference.py ARGV`` without a new interpreter (torch imports once): the SystemExit, or None."""
    monkeypatch.setattr(sys, "argv", ["inference.py", *map(str, argv)])
    root = logging.getLogger()  # the script's logging.basicConfig must not outlive the test
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    try:
        runpy.run_path(str(REPO_ROOT / "inference.py"), run_name="__main__")
    except SystemExit as exit_:
        return exit_
    return None


def test_cli_all_inputs_unreadable(checkpoint, tmp_path, monkeypatch, caplog):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is no PNG")
    with caplog.at_level(logging.WARNING):
        exit_ = run_cli_in_process(monkeypatch, "--checkpoint", checkpoint, "--input", bad, tmp_path / "missing.jpg",
                                   "--output-dir", tmp_path / "out", "--workers", "0")
    # sys.exit("error: ...") prints the message to stderr and exits with status 1.
    assert exit_ is not None and "none of the 1 input images could be read" in str(exit_.code)
    assert "bad.png" in caplog.text and "missing.jpg" in caplog.text
    assert not (tmp_path / "out" / "detections.json").exists()

    exit_ = run_cli_in_process(monkeypatch, "--checkpoint", tmp_path / "nope.pth", "--input", bad)
    assert "checkpoint not found" in str(exit_.code)


def test_glob_and_single_file(checkpoint, image_dir, tmp_path):
    summary = run_main("--checkpoint", checkpoint, "--input", image_dir / "*.jpg", image_dir / "alpha.png",
                       "--output-dir", tmp_path / "out", "--score-threshold", "0.3", "--workers", "0",
                       "--batch-size", "2", "--image-format", "png")
    expected = {name: VALID_IMAGES[name] for name in ("photo.jpg", "rotated.jpg", "alpha.png")}
    assert check_records(load_records(tmp_path / "out"), expected) == summary["num_detections"]
    assert summary["num_images"] == 3 and summary["num_skipped"] == 1  # corrupt.jpg matches the glob
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["alpha.png", "photo.png", "rotated.png"]


def test_high_threshold_keeps_images_without_detections(checkpoint, image_dir, tmp_path):
    summary = run_main("--checkpoint", checkpoint, "--input", image_dir / "gray.bmp", "--output-dir",
                       tmp_path / "out", "--score-threshold", "1.0", "--workers", "0")
    records = load_records(tmp_path / "out")
    assert summary["num_detections"] == 0 and records["gray.bmp"]["detections"] == []
    assert (tmp_path / "out" / "gray.jpg").is_file()


def test_refuses_to_overwrite_without_flag(checkpoint, image_dir, tmp_path):
    output_dir = tmp_path / "out"
    single = image_dir / "photo.jpg"
    run_main("--checkpoint", checkpoint, "--input", single, "--output-dir", output_dir, "--workers", "0")
    (output_dir / "detections.json").write_text("[]")  # marker: must survive the refused run
    with pytest.raises(InferenceError, match="--overwrite"):
        run_main("--checkpoint", checkpoint, "--input", single, "--output-dir", output_dir, "--workers", "0")
    assert (output_dir / "detections.json").read_text() == "[]"
    run_main("--checkpoint", checkpoint, "--input", single, "--output-dir", output_dir, "--workers", "0",
             "--overwrite")
    assert list(load_records(output_dir)) == ["photo.jpg"]


def test_never_overwrites_an_input_image(checkpoint, image_dir):
    with pytest.raises(InferenceError, match="would overwrite input image"):
        run_main("--checkpoint", checkpoint, "--input", image_dir / "photo.jpg", "--output-dir", image_dir,
                 "--overwrite", "--workers", "0")


def test_default_output_dir_is_a_fresh_run(checkpoint, image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inference_output" / "run_2").mkdir(parents=True)
    (tmp_path / "inference_output" / "run_old").mkdir()
    summary = run_main("--checkpoint", checkpoint, "--input", image_dir / "gray.bmp", "--workers", "0")
    assert Path(summary["output_dir"]) == Path("inference_output/run_3")
    assert (tmp_path / "inference_output" / "run_3" / "detections.json").is_file()
    assert make_output_dir(None) == Path("inference_output/run_4")


def test_unreadable_inputs_raise(checkpoint, tmp_path, caplog):
    (tmp_path / "broken.webp").write_bytes(b"RIFF0000WEBPjunk")
    with caplog.at_level(logging.WARNING), pytest.raises(InferenceError, match="could be read"):
        run_main("--checkpoint", checkpoint, "--input", tmp_path, "--output-dir", tmp_path / "out", "--workers", "0")
    assert "broken.webp" in caplog.text
    with pytest.raises(InferenceError, match="no image files"):
        run_main("--checkpoint", checkpoint, "--input", tmp_path / "nothing*.jpg", "--workers", "0")


def test_weights_option_uses_model_weights(checkpoint, image_dir, tmp_path, monkeypatch):
    calls = []

    def load_detector(spec, map_location="cpu", what="weights file"):
        calls.append(spec)
        return tiny_model().eval(), CATEGORIES

    monkeypatch.setattr(inference, "load_detector", load_detector)  # the repository's one model loader
    run_main("--weights", "SomeWeights.COCO_V1", "--input", image_dir / "photo.jpg", "--output-dir",
             tmp_path / "out", "--workers", "0", "--score-threshold", "0.3")
    assert calls == ["SomeWeights.COCO_V1"]
    check_records(load_records(tmp_path / "out"), {"photo.jpg": VALID_IMAGES["photo.jpg"]})


def test_weights_option_with_a_real_checkpoint(checkpoint, image_dir, tmp_path):
    run_main("--weights", checkpoint, "--input", image_dir / "rotated.jpg", "--output-dir", tmp_path / "out",
             "--workers", "0", "--score-threshold", "0.3")
    check_records(load_records(tmp_path / "out"), {"rotated.jpg": VALID_IMAGES["rotated.jpg"]})


def test_list_images_and_output_names(image_dir):
    (image_dir / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(image_dir / "sub" / "photo.png")
    flat, missing = list_images([str(image_dir), str(image_dir / "photo.jpg")])
    assert [Path(p).name for p in flat] == ["alpha.png", "corrupt.jpg", "gray.bmp", "photo.jpg", "rotated.jpg"]
    assert missing == 0
    deep, _ = list_images([str(image_dir)], recursive=True)
    assert len(deep) == 6
    assert output_names(deep, "jpg")[-1] == "photo_2.jpg"
    assert list_images([str(image_dir / "nope.jpg")]) == ([], 1)


def test_amp_bf16_on_cpu(checkpoint, image_dir, tmp_path):
    summary = run_main("--checkpoint", checkpoint, "--input", image_dir / "photo.jpg", "--output-dir",
                       tmp_path / "out", "--workers", "0", "--amp", "--score-threshold", "0.3")
    assert summary["num_images"] == 1
    check_records(load_records(tmp_path / "out"), {"photo.jpg": VALID_IMAGES["photo.jpg"]})


@pytest.mark.parametrize("with_font", [True, False])
def test_draw_detections_small_and_large(monkeypatch, with_font):
    if not with_font:
        monkeypatch.setattr(visualize, "find_font", lambda: None)  # the bitmap-font fallback
    small_width, small_font = visualize.drawing_sizes(64, 64)
    large_width, large_font = visualize.drawing_sizes(3000, 3000)
    assert 1 <= small_width <= 2 and 6 <= small_font <= 12
    assert 5 <= large_width <= 20 and 40 <= large_font <= 150
    assert visualize.drawing_sizes(100, 4000)[1] <= 50  # a thin strip gets a font that fits it

    for size, box, line_width in ((64, [10, 12, 50, 60], small_width), (3000, [100, 200, 2500, 2800], large_width)):
        image = torch.full((3, size, size), 128, dtype=torch.uint8)
        drawn = visualize.draw_detections(image, torch.tensor([box], dtype=torch.float32), torch.tensor([1]),
                                          torch.tensor([0.87]), ["a", "b", "c"])
        assert drawn.shape == image.shape and drawn.dtype == torch.uint8
        assert (image == 128).all()  # input untouched
        x1, y1, x2, y2 = box
        changed = (drawn != image).any(0)
        assert changed[y1:y2 + 1, x1:x2 + 1].any()
        # The left edge, below the label, is as thick as the chosen line width.
        mid_y = (y1 + y2) // 2 + 5
        assert changed[mid_y, x1:x1 + line_width].all() and not changed[mid_y, x1 + line_width + 2]
        assert not changed[:, :x1].any()  # nothing drawn outside the box


def test_small_boxes_on_a_large_image_get_labels_about_a_box_high():
    assert visualize.drawing_sizes(3000, 3000, box_side=24) == (2, 24)
    assert visualize.drawing_sizes(3000, 3000, box_side=4) == (1, 10)  # still readable
    assert visualize.drawing_sizes(3000, 3000, box_side=2000) == visualize.drawing_sizes(3000, 3000)
    image = torch.full((3, 3000, 3000), 128, dtype=torch.uint8)
    boxes = torch.tensor([[100, 100, 124, 124], [300, 300, 320, 328]], dtype=torch.float32)
    drawn = visualize.draw_detections(image, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), ["a", "b", "c"])
    changed = (drawn != image).any(0)
    # a 75 px label (the image's own size) would reach 60 px above the first box; a box-high one stays near it
    assert changed[:1000, :1000].sum() < 60 * 200 and not changed[:60, :].any()


def test_class_colors_distinct_and_empty_draw():
    colors = [visualize.class_color(k) for k in range(10)]
    assert len(set(colors)) == 10 and colors == [visualize.class_color(k) for k in range(10)]
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    drawn = visualize.draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                                      torch.zeros(0), [])
    assert torch.equal(drawn, image) and drawn.data_ptr() != image.data_ptr()
