"""CocoDetection: target conversion, validation messages, transforms, build_dataset."""
import argparse
import copy
import json
import logging
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from coco_dataset import CocoDetection, Compose, RandomHorizontalFlip, build_dataset, parse_coco_detection
from utils.data.image_io import ImageReadError
from utils.data.loaders import collate_eval


def base_dataset():
    """Three images (ids 5, 2, 9), non-contiguous category ids, crowd / clipped / degenerate boxes."""
    return {
        "images": [{"id": 5, "file_name": "a.png", "height": 30, "width": 40},
                   {"id": 2, "file_name": "b.png", "height": 50, "width": 20},
                   {"id": 9, "file_name": "c.png", "height": 32, "width": 32}],  # no annotations
        "categories": [{"id": 90, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 90, "bbox": [10, 5, 12, 8], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [-5, 20, 100, 20], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 5, "category_id": 7, "bbox": [1, 1, 10, 10], "iscrowd": 1},  # crowd
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [2, 2, 0, 5]},  # zero width
            {"id": 5, "image_id": 2, "category_id": 7, "bbox": [100, 100, 5, 5]},  # outside the image
            {"id": 6, "image_id": 2, "category_id": 90, "bbox": [0, 0, 20, 50]},
        ],
    }


def write_dataset(root, dataset, split="train", make_images=True):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps(dataset))
    if make_images:
        for image in dataset["images"]:
            Image.new("RGB", (image["width"], image["height"])).save(root / split / image["file_name"])
    return root / split, ann_file


@pytest.fixture
def coco_root(tmp_path):
    write_dataset(tmp_path, base_dataset())
    return tmp_path


def test_targets_and_category_mapping(coco_root, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetection(coco_root / "train", coco_root / "annotations" / "instances_train.json")
    assert dataset.ids == [2, 5, 9] and len(dataset) == 3
    assert dataset.cat_ids == [3, 7, 90] and dataset.num_classes == 3
    assert dataset.cat_id_to_label == {3: 0, 7: 1, 90: 2}
    assert dataset.category_names == ["car", "dog", "zebra"]
    assert dataset.categories == [{"id": 3, "name": "car"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "zebra"}]
    assert all(dataset.cat_ids[dataset.cat_id_to_label[c]] == c for c in (3, 7, 90))  # both ways
    assert dataset.aspect_ratios() == [20 / 50, 40 / 30, 1.0]
    assert len(dataset.coco.getAnnIds()) == 6  # pycocotools sees the raw file, for evaluation

    image, target = dataset[1]  # image id 5
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert target["image_id"] == 5 and target["orig_size"] == (30, 40)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 5, 22, 13], [0, 20, 40, 30]]))
    assert target["labels"].tolist() == [2, 0]  # zebra (id 90), car (id 3)
    # The crowd region is only in crowd_boxes, never a training label.
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[1.0, 1, 11, 11]]))

    _, target = dataset[0]  # image id 2: two of its three boxes are empty after clipping
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 20, 50]]))
    assert target["labels"].tolist() == [2] and target["crowd_boxes"].shape == (0, 4)
    assert "dropped 2 of 6 annotations" in caplog.text and "annotation id 4" in caplog.text

    image, target = dataset[2]  # image id 9: kept as a negative
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["crowd_boxes"].shape == (0, 4)


def test_filter_empty(tmp_path):
    data = base_dataset()
    data["annotations"].append({"id": 7, "image_id": 9, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    image_dir, ann_file = write_dataset(tmp_path, data)
    assert CocoDetection(image_dir, ann_file).ids == [2, 5, 9]
    filtered = CocoDetection(image_dir, ann_file, filter_empty=True)
    assert filtered.ids == [2, 5]  # image 9 has only a crowd region
    assert filtered.aspect_ratios() == [20 / 50, 40 / 30]
    assert filtered[1][1]["image_id"] == 5


def test_size_mismatch_and_unreadable_images_name_the_file(coco_root):
    dataset = CocoDetection(coco_root / "train", coco_root / "annotations" / "instances_train.json")
    Image.new("RGB", (30, 40)).save(coco_root / "train" / "a.png")  # transposed size
    with pytest.raises(ImageReadError, match=r"a\.png.*decodes to 40x30 .* says 30x40"):
        dataset[1]
    (coco_root / "train" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match=r"b\.png"):
        dataset[0]
    (coco_root / "train" / "c.png").unlink()
    with pytest.raises(ImageReadError, match=r"c\.png.*not found"):
        dataset[2]


def set_key(path, value):
    def mutate(data):
        *parents, last = path
        node = data
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return mutate


DELETE = object()
MALFORMED = [
    ("no annotations key", set_key(["annotations"], DELETE), r"top-level key 'annotations' is missing"),
    ("images not a list", set_key(["images"], {"id": 1}), r"top-level key 'images' is a dict"),
    ("no bbox", set_key(["annotations", 2, "bbox"], DELETE), r"annotation #2 \(id 3, image_id 5\) has no 'bbox'"),
    ("no image_id", set_key(["annotations", 0, "image_id"], DELETE), r"annotation #0 \(id 1\) has no 'image_id'"),
    ("no category_id", set_key(["annotations", 1, "category_id"], DELETE), r"annotation #1 .* has no 'category_id'"),
    ("no ann id", set_key(["annotations", 1, "id"], DELETE), r"annotation #1 \(image_id 5\) has no 'id'"),
    ("annotation not an object", set_key(["annotations", 1], [1, 2]), r"annotation #1 is not a JSON object"),
    ("unknown category", set_key(["annotations", 1, "category_id"], 999),
     r"annotation id 2 \(image_id 5\) has category_id 999, which is not in 'categories' \(ids: \[3, 7, 90\]\)"),
    ("unknown image", set_key(["annotations", 5, "image_id"], 77),
     r"annotation id 6 \(image_id 77\) refers to image_id 77, which is not in 'images'"),
    ("nan bbox", set_key(["annotations", 0, "bbox"], [1, float("nan"), 2, 2]),
     r"annotation id 1 \(image_id 5\) has a non-finite bbox"),
    ("inf bbox", set_key(["annotations", 0, "bbox"], [1, 1, float("inf"), 2]), r"non-finite bbox"),
    ("negative width", set_key(["annotations", 3, "bbox"], [1, 1, -2, 2]),
     r"annotation id 4 \(image_id 2\) has a bbox with negative width/height"),
    ("short bbox", set_key(["annotations", 3, "bbox"], [1, 1, 2]),
     r"annotation #3 \(id 4, image_id 2\) has bbox \[1, 1, 2\]; expected \[x, y, width, height\]"),
    ("string in bbox", set_key(["annotations", 3, "bbox"], [1, 1, "2", 2]), r"annotation #3 .*expected \[x, y"),
    ("string category id", set_key(["categories", 1, "id"], "car"),
     r"category #1 \(id 'car'\) has id='car'; COCO ids must be integers"),
    ("no category name", set_key(["categories", 0, "name"], DELETE), r"category #0 \(id 90\) has no 'name'"),
    ("duplicate image id", set_key(["images", 1, "id"], 5), r"image id 5 appears more than once"),
    ("duplicate annotation id", set_key(["annotations", 1, "id"], 1), r"annotation id 1 appears more than once"),
    ("image without width", set_key(["images", 2, "width"], DELETE), r"image #2 \(id 9\) has no 'width'"),
    ("zero height", set_key(["images", 0, "height"], 0), r"image id 5 has height=0, width=40; both must be positive"),
    ("no images", set_key(["images"], []), r"the dataset has no images"),
    ("no categories", set_key(["categories"], []), r"'categories' is empty"),
    ("string width", set_key(["images", 1, "width"], "20"), r"image #1 \(id 2\) has width='20', expected a number"),
]


@pytest.mark.parametrize("mutate, message", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_annotations_are_named(tmp_path, mutate, message):
    data = base_dataset()
    image_dir, ann_file = write_dataset(tmp_path, data)
    mutate(data)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value)


def test_missing_and_unparsable_files(coco_root):
    write_dataset(coco_root, base_dataset(), split="val2017", make_images=False)
    ann_dir = coco_root / "annotations"
    with pytest.raises(FileNotFoundError, match=r"instances_test\.json not found; splits found in .*: train, val2017"):
        build_dataset(str(coco_root), "test")
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere not found"):
        CocoDetection(coco_root / "nowhere", ann_dir / "instances_train.json")
    with pytest.raises(FileNotFoundError, match=r"none of the images checked exist"):
        CocoDetection(coco_root / "val2017", ann_dir / "instances_train.json")  # empty folder
    (ann_dir / "instances_train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_train\.json: not a valid JSON file"):
        CocoDetection(coco_root / "train", ann_dir / "instances_train.json")
    (ann_dir / "instances_train.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"not a COCO detection file: the top level is a list"):
        CocoDetection(coco_root / "train", ann_dir / "instances_train.json")
    with pytest.raises(FileNotFoundError, match=r"folder .*absent does not exist"):
        CocoDetection(coco_root / "train", coco_root / "absent" / "instances_train.json")


def test_flip_moves_boxes_with_the_pixels():
    height, width = 20, 30
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, 4:9, 3:11] = 255  # white rectangle: x in [3, 11), y in [4, 9)
    image[:, 12:15, 20:26] = 255  # the crowd region
    target = {"boxes": torch.tensor([[3.0, 4, 11, 9]]), "labels": torch.tensor([1]),
              "crowd_boxes": torch.tensor([[20.0, 12, 26, 15]]), "image_id": 1, "orig_size": (height, width)}
    original = copy.deepcopy(target)
    flipped_image, flipped = RandomHorizontalFlip(p=1.0)(image, target)

    # Each flipped box is all white, and together they hold every white pixel: they bound the content.
    white = flipped_image[0] == 255
    covered = torch.zeros_like(white)
    for key in ("boxes", "crowd_boxes"):
        x1, y1, x2, y2 = flipped[key][0].long().tolist()
        assert white[y1:y2, x1:x2].all()
        covered[y1:y2, x1:x2] = True
    assert torch.equal(covered, white)
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[19.0, 4, 27, 9]]))  # W - x2, W - x1
    torch.testing.assert_close(flipped["crowd_boxes"], torch.tensor([[4.0, 12, 10, 15]]))
    assert flipped["labels"].tolist() == [1] and flipped["orig_size"] == (height, width)
    assert all(torch.equal(target[k], original[k]) for k in ("boxes", "crowd_boxes"))  # input untouched

    same_image, same = Compose([RandomHorizontalFlip(p=0.0)])(image, target)
    assert torch.equal(same_image, image) and torch.equal(same["boxes"], target["boxes"])
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(p=1.5)


def test_flip_inside_dataset_matches_pixels(tmp_path):
    data = base_dataset()
    image_dir, ann_file = write_dataset(tmp_path, data)
    canvas = np.zeros((30, 40, 3), dtype=np.uint8)
    canvas[5:13, 10:22] = 255  # exactly annotation 1's box
    Image.fromarray(canvas).save(image_dir / "a.png")
    dataset = CocoDetection(image_dir, ann_file, transforms=Compose([RandomHorizontalFlip(1.0)]))
    image, target = dataset[1]
    x1, y1, x2, y2 = target["boxes"][0].long().tolist()
    rows, cols = (image[0] == 255).nonzero(as_tuple=True)
    assert (x1, y1, x2, y2) == (cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1)


def test_build_dataset_and_collate(coco_root):
    root = str(coco_root)
    train = build_dataset(root, "train", train=True)
    assert isinstance(train.transforms, Compose) and train.transforms.transforms[0].p == 0.5
    assert build_dataset(root, "train", train=False).transforms is None
    train = build_dataset(root, "train", train=True, hflip_prob=0.0, filter_empty=True)
    assert train.transforms is None and train.ids == [2, 5]
    # evaluation never filters
    assert build_dataset(root, "train", train=False, hflip_prob=0.0, filter_empty=True).ids == [2, 5, 9]

    images, targets = collate_eval([train[0], train[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [tuple(i.shape) for i in images] == [(3, 50, 20), (3, 30, 40)]
    assert [t["image_id"] for t in targets] == [2, 5]


def synthetic_annotations(num_anns: int, num_images: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    boxes = rng.uniform(1, 300, (num_anns, 4)).round(2).tolist()
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(num_images)],
            "categories": [{"id": c, "name": str(c)} for c in range(1, 91)],
            "annotations": [{"id": i, "image_id": i % num_images, "category_id": 1 + i % 90, "bbox": box,
                             "iscrowd": 0} for i, box in enumerate(boxes)]}


def count_calls(function, *args) -> dict:
    """Python-level calls (``call``) and calls into C (``c_call``) made while ``function(*args)`` runs."""
    counts = {"call": 0, "c_call": 0}

    def profile(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(profile)
    try:
        function(*args)
    finally:
        sys.setprofile(None)
    return counts


def test_parse_is_vectorised_on_a_large_annotation_file():
    """train2017 has 860k annotations: parsing must be array work, never a Python function per annotation.
    Counted, not timed: ten times the annotations make not one more Python-level call, and at most a
    two calls into C each (the comprehensions that gather the columns)."""
    small, large = synthetic_annotations(2_000), synthetic_annotations(20_000)
    parsed = parse_coco_detection(large)
    assert parsed.boxes.shape == (20_000, 4) and parsed.num_dropped == 0
    small_calls, large_calls = count_calls(parse_coco_detection, small), count_calls(parse_coco_detection, large)
    assert large_calls["call"] == small_calls["call"], (small_calls, large_calls)
    assert large_calls["c_call"] - small_calls["c_call"] <= 2 * 18_000, (small_calls, large_calls)


extremes = [0.0, -0.0, 1e-4, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e6, 1e6),
                          st.sampled_from(extremes), st.integers(-10**6, 10**6))
plausible_box = st.tuples(st.floats(-100, 5000), st.floats(-100, 5000), st.floats(0, 3000),
                          st.floats(0, 3000)).map(list)
any_box = st.one_of(plausible_box, st.lists(finite_or_not, min_size=4, max_size=4))


def annotations(box):
    """(image index, category index, bbox, iscrowd) lists; only-plausible lists reach the conversion often."""
    return st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1), box, st.booleans()), max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=3, max_size=3),
       anns=st.one_of(annotations(plausible_box), annotations(any_box)))
def test_parse_property_random_and_extreme_boxes(sizes, anns):
    data = {"images": [{"id": 10 + i, "file_name": f"{i}.jpg", "height": h, "width": w}
                       for i, (h, w) in enumerate(sizes)],
            "categories": [{"id": 4, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": i, "image_id": 10 + img, "category_id": (4, 2)[cat], "bbox": bbox,
                             "iscrowd": int(crowd)} for i, (img, cat, bbox, crowd) in enumerate(anns)]}
    try:
        parsed = parse_coco_detection(data, source="prop.json")
    except ValueError as e:  # the only documented failures for valid structure
        assert "prop.json" in str(e)
        assert "non-finite bbox" in str(e) or "negative width/height" in str(e)
        assert any(not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0 for _, _, bbox, _ in anns)
        return
    # Reference: the same conversion written per annotation in plain Python.
    expected = []
    for img, cat, (x, y, w, h), crowd in anns:
        height, width = sizes[img]
        box = np.array([min(max(x, 0), width), min(max(y, 0), height),
                        min(max(x + w, 0), width), min(max(y + h, 0), height)], dtype=np.float32)
        if box[2] - box[0] > 1e-3 and box[3] - box[1] > 1e-3:
            expected.append((img, box, 1 - cat, crowd))  # category 2 -> label 0, 4 -> label 1
    expected.sort(key=lambda item: item[0])  # grouped by image, stable
    assert parsed.num_dropped == len(anns) - len(expected)
    assert parsed.boxes.dtype == np.float32 and parsed.boxes.shape == (len(expected), 4)
    np.testing.assert_array_equal(parsed.boxes, np.array([e[1] for e in expected]).reshape(-1, 4))
    assert parsed.labels.tolist() == [e[2] for e in expected]
    assert parsed.is_crowd.tolist() == [e[3] for e in expected]
    assert np.diff(parsed.ann_offsets).tolist() == [sum(e[0] == i for e in expected) for i in range(3)]
    assert np.isfinite(parsed.boxes).all()
