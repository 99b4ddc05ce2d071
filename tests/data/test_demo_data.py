"""Tests for utils/data/demo_data.py and demo_shapes.py: COCO validity, box tightness, determinism, caching."""
import json
import os
import re
import zlib

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from utils.data import demo_data, demo_shapes
from utils.data.demo_data import DEMO_CATEGORIES, MARKER_NAME, ensure_demo_dataset, generate_demo_dataset
from utils.data.demo_shapes import render_image, shape_mask
from utils.runtime.errors import UserError

SMALL = dict(num_train=20, num_val=6, image_size=96, show_progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return generate_demo_dataset(root, seed=0, **SMALL)


def _load(summary, split="train"):
    with open(summary["annotation_files"][split]) as f:
        return json.load(f)


def test_layout_and_pycocotools_load(dataset):
    root = dataset["root"]
    for split, num_images in (("train", 20), ("val", 6)):
        coco = COCO(os.path.join(root, "annotations", f"instances_{split}.json"))
        assert len(coco.getImgIds()) == num_images
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(os.path.join(root, split, image["file_name"])) as pil_image:
                assert pil_image.format == "JPEG"
                assert pil_image.size == (image["width"], image["height"]) == (96, 96)
    assert os.path.isfile(os.path.join(root, MARKER_NAME))


def test_categories_are_non_contiguous_and_complete(dataset):
    categories = _load(dataset)["categories"]
    ids = [c["id"] for c in categories]
    assert len(ids) >= 3 and ids != list(range(1, len(ids) + 1))
    assert all({"id", "name", "supercategory"} <= set(c) for c in categories)
    assert ids == [c["id"] for c in DEMO_CATEGORIES]


def test_boxes_inside_image_and_well_formed(dataset):
    coco = _load(dataset)
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    category_ids = {c["id"] for c in coco["categories"]}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert all(isinstance(v, float) for v in ann["bbox"])
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        assert ann["category_id"] in category_ids and ann["iscrowd"] == 0
        assert 0 < ann["area"] <= w * h


def test_object_sizes_span_small_to_large(dataset):
    longest_sides = [max(a["bbox"][2:]) for a in _load(dataset)["annotations"]]
    assert min(longest_sides) <= 20  # COCO "small" territory
    assert max(longest_sides) >= 60  # most of a 96 px image
    per_image = np.bincount([a["image_id"] for a in _load(dataset)["annotations"]])
    assert per_image.max() <= demo_shapes.MAX_OBJECTS


@pytest.mark.parametrize("empty_fraction", [0.0, 0.5, 1.0])
def test_empty_fraction(tmp_path, empty_fraction):
    summary = generate_demo_dataset(str(tmp_path), seed=1, empty_fraction=empty_fraction, **SMALL)
    coco = _load(summary)
    non_empty = {a["image_id"] for a in coco["annotations"]}
    num_empty = sum(image["id"] not in non_empty for image in coco["images"])
    if empty_fraction == 0.0:
        assert num_empty == 0
    elif empty_fraction == 1.0:
        assert num_empty == len(coco["images"])
    else:
        assert 0 < num_empty < len(coco["images"])


def _split_contents(root, split="train"):
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "rb") as f:
        annotation_bytes = f.read()
    names = sorted(os.listdir(os.path.join(root, split)))
    pixels = [np.asarray(Image.open(os.path.join(root, split, name))) for name in names]
    return annotation_bytes, names, pixels


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    first = _split_contents(generate_demo_dataset(str(tmp_path / "a"), seed=3, **SMALL)["root"])
    second = _split_contents(generate_demo_dataset(str(tmp_path / "b"), seed=3, **SMALL)["root"])
    other = _split_contents(generate_demo_dataset(str(tmp_path / "c"), seed=4, **SMALL)["root"])
    assert first[0] == second[0] and first[1] == second[1]
    assert all(np.array_equal(p, q) for p, q in zip(first[2], second[2]))
    assert first[0] != other[0]
    assert not all(np.array_equal(p, q) for p, q in zip(first[2], other[2]))


def test_non_square_image_size(tmp_path):
    summary = generate_demo_dataset(str(tmp_path), num_train=4, num_val=2, image_size=(64, 112),
                                    splits=("train2017", "val2017"), show_progress=False)
    coco = _load(summary, "val2017")
    assert all((im["height"], im["width"]) == (64, 112) for im in coco["images"])
    assert os.path.isfile(os.path.join(str(tmp_path), "train2017", "000000.jpg"))


def test_ensure_regenerates_only_when_needed(tmp_path, monkeypatch):
    root = str(tmp_path)
    calls = []
    real_generate = demo_data.generate_demo_dataset

    def counting_generate(*args, **kwargs):
        calls.append(args)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(demo_data, "generate_demo_dataset", counting_generate)
    assert ensure_demo_dataset(root, **SMALL) == root
    assert len(calls) == 1
    ensure_demo_dataset(root, **SMALL)
    assert len(calls) == 1, "a complete dataset with the same parameters must be reused"
    ensure_demo_dataset(root, **{**SMALL, "num_val": 7})
    assert len(calls) == 2, "different parameters must regenerate"
    os.remove(os.path.join(root, MARKER_NAME))
    ensure_demo_dataset(root, **{**SMALL, "num_val": 7})
    assert len(calls) == 3, "a missing marker means an incomplete dataset"


def test_interrupted_generation_leaves_no_marker(tmp_path, monkeypatch):
    root = str(tmp_path)
    ensure_demo_dataset(root, **SMALL)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(demo_data, "render_image", crash)
    with pytest.raises(RuntimeError):
        generate_demo_dataset(root, seed=9, **SMALL)
    assert not os.path.exists(os.path.join(root, MARKER_NAME))


@pytest.mark.parametrize("name", [c["name"] for c in DEMO_CATEGORIES])
@pytest.mark.parametrize("extent", [12, 31, 80])
def test_shape_mask_is_tight(name, extent):
    for seed in range(5):
        mask = shape_mask(name, extent, np.random.default_rng(seed))
        # Tight: every edge row and column of the crop holds a drawn pixel.
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert abs(max(mask.shape) - extent) <= 1
        # Placed on a blank canvas, the drawn pixels' bbox is exactly the crop.
        canvas = np.zeros((100, 100), dtype=bool)
        canvas[7:7 + mask.shape[0], 11:11 + mask.shape[1]] = mask
        rows, cols = np.nonzero(canvas)
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == \
            (11, 7, 11 + mask.shape[1], 7 + mask.shape[0])


def test_rendered_boxes_match_visible_pixels_and_contrast():
    distances = []
    for index in range(40):
        pixels, label_map, objects = render_image(np.random.default_rng([5, index]), 96, 96, 0.0)
        image = pixels.astype(np.float64)
        for k, obj in enumerate(objects):
            rows, cols = np.nonzero(label_map == k + 1)
            x, y, w, h = (int(v) for v in obj["bbox"])
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert obj["area"] == len(rows)
            ring = np.zeros(label_map.shape, dtype=bool)
            ring[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
            ring[y:y + h, x:x + w] = False
            ring &= label_map == 0
            if ring.sum() >= 5:
                distances.append(np.linalg.norm(image[label_map == k + 1].mean(0) - image[ring].mean(0)))
    # Objects stand out from the background around them (colour is random, contrast is not).
    assert np.mean(np.asarray(distances) > 40) >= 0.9


def test_cli_help_documents_every_option(capsys):
    parser = demo_data.get_args_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "--num-train" in capsys.readouterr().out


def test_cli_main_writes_dataset(tmp_path):
    args = demo_data.get_args_parser().parse_args(
        ["--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "48", "64", "--quiet"])
    demo_data.main(args)
    with open(os.path.join(str(tmp_path), MARKER_NAME)) as f:
        assert json.load(f)["image_size"] == [48, 64]


@pytest.mark.parametrize("argv, message", [
    (["--image-size", "5"], "image_size 5 too small"),
    (["--empty-fraction", "2"], "empty_fraction must be in [0, 1]"),
    (["--root", os.devnull + "/demo"], "cannot write the dataset there"),  # a file where a folder must go
])
def test_cli_mistakes_are_user_errors_with_one_line(tmp_path, argv, message):
    argv = ["--root", str(tmp_path / "demo"), "--num-train", "1", "--num-val", "1", "--quiet"] + argv
    with pytest.raises(UserError, match=re.escape(message)):
        demo_data.main(demo_data.get_args_parser().parse_args(argv))


def test_the_default_demo_images_are_those_of_before_the_presets():
    # Objects and pixel sums of the first two val images of the built-in demo (seed 0), as generated
    # before render_image took object counts, sizes and clutter as options: the default draws the same.
    expected = [
        ([(7, [32.0, 24.0, 73.0, 64.0], 1847.0), (12, [53.0, 60.0, 76.0, 76.0], 2908.0),
          (3, [116.0, 27.0, 41.0, 47.0], 1149.0), (12, [118.0, 85.0, 42.0, 43.0], 1087.0)], 8100172),
        ([(3, [28.0, 66.0, 77.0, 93.0], 5656.0), (7, [58.0, 16.0, 77.0, 71.0], 2230.0),
          (7, [114.0, 4.0, 36.0, 47.0], 823.0), (12, [19.0, 9.0, 30.0, 36.0], 515.0),
          (7, [86.0, 29.0, 31.0, 27.0], 392.0), (7, [8.0, 18.0, 22.0, 23.0], 234.0)], 9216880)]
    for index, (objects, pixel_sum) in enumerate(expected):
        rng = np.random.default_rng([0, zlib.crc32(b"val"), index])
        pixels, _, drawn = render_image(rng, 160, 160)
        assert [(o["category_id"], o["bbox"], o["area"]) for o in drawn] == objects
        assert int(pixels.astype(np.int64).sum()) == pixel_sum


def _boxes_per_image(coco):
    per_image = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann["bbox"])
    return per_image


def test_sparse_preset_has_few_small_objects(tmp_path):
    summary = generate_demo_dataset(str(tmp_path), num_train=40, num_val=2, preset="sparse", show_progress=False)
    coco = _load(summary)
    assert all((im["width"], im["height"]) == (128, 128) for im in coco["images"])
    counts = [len(boxes) for boxes in _boxes_per_image(coco).values()]
    assert max(counts) == 2 and counts.count(1) > 5 and 0 < counts.count(0) < 10  # 10 % empty
    sides = [max(box[2:]) for boxes in _boxes_per_image(coco).values() for box in boxes]
    assert max(sides) <= 17 and np.median(sides) >= 11  # extents 10..16 px (+1 of rasterising)
    assert summary["params"]["preset"] == "sparse" and summary["params"]["render"]["object_size"] == [10, 16]


def test_large_preset_draws_many_small_objects_at_varied_sizes(tmp_path):
    # The preset's drawing on smaller images (an explicit image_size wins), to stay fast.
    summary = generate_demo_dataset(str(tmp_path), num_train=3, num_val=1, image_size=(500, 600), preset="large",
                                    show_progress=False)
    coco = _load(summary)
    sizes = [(im["height"], im["width"]) for im in coco["images"]]
    assert len(set(sizes)) == 3 and all(400 <= h <= 500 and 480 <= w <= 600 for h, w in sizes)  # jitter 0.2
    counts = [len(boxes) for boxes in _boxes_per_image(coco).values()]
    assert min(counts) >= 15 and max(counts) <= 60  # 20-60 drawn; a few may find no free spot
    sides = [max(a["bbox"][2:]) for a in coco["annotations"]]
    assert max(sides) <= 41 and np.percentile(sides, 90) >= 25
    large = demo_data.PRESETS["large"]
    assert (large["num_train"], large["num_val"]) == (24, 8) and min(large["image_size"]) * 0.8 >= 2000


def test_a_changed_preset_regenerates_and_explicit_values_win(tmp_path, monkeypatch):
    root = str(tmp_path)
    calls = []
    real_generate = demo_data.generate_demo_dataset
    monkeypatch.setattr(demo_data, "generate_demo_dataset", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    small = dict(num_train=3, num_val=2, show_progress=False)
    ensure_demo_dataset(root, **small, preset="sparse")
    ensure_demo_dataset(root, **small, preset="sparse")
    assert len(calls) == 1
    ensure_demo_dataset(root, **small)  # the demo in the same folder: regenerated
    assert len(calls) == 2
    with open(os.path.join(root, MARKER_NAME)) as f:
        marker = json.load(f)
    assert "preset" not in marker and marker["image_size"] == [160, 160]  # the demo's marker as before
    monkeypatch.setitem(demo_data.PRESETS["sparse"], "render", {**demo_data.PRESETS["sparse"]["render"],
                                                                 "object_size": [10, 14]})
    ensure_demo_dataset(root, **small, preset="sparse")
    ensure_demo_dataset(root, **small, preset="sparse", empty_fraction=0.0)
    assert len(calls) == 4
    with open(os.path.join(root, MARKER_NAME)) as f:
        marker = json.load(f)
    assert marker["empty_fraction"] == 0.0 and marker["render"]["object_size"] == [10, 14]
    assert marker["image_size"] == [128, 128] and marker["num_images"] == {"train": 3, "val": 2}
    with pytest.raises(ValueError, match="unknown preset 'dense'"):
        generate_demo_dataset(root, preset="dense")


def test_cli_preset(tmp_path):
    args = demo_data.get_args_parser().parse_args(
        ["--preset", "sparse", "--root", str(tmp_path), "--num-train", "2", "--num-val", "1", "--quiet"])
    demo_data.main(args)
    with open(os.path.join(str(tmp_path), MARKER_NAME)) as f:
        assert json.load(f)["preset"] == "sparse"
    assert demo_data.preset_root("sparse") == "data/demo-sparse" and demo_data.preset_root() == "data/demo"
