"""tools/convert_to_coco.py: VOC, YOLO and CSV folders made here convert (problems skipped and named),
the result trains with train.py --recipe demo, and malformed files stop with their file and line."""
import contextlib
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
from PIL import Image

import coco_dataset
from utils.data.formats.common import ConversionError
from utils.data.formats.yolo import parse_yaml_names

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TRAIN = ["--recipe", "demo", "--train-split", "train", "--val-split", "train", "--max-iters", "2",
              "--batch-size", "2", "--workers", "0", "--backbone", "resnet18", "--fpn-channels", "16",
              "--head-convs", "1", "--min-size", "64", "--max-size", "64", "--num-threads", "1", "--print-freq", "1"]


def load_tool(name):
    """A script of tools/ as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image(path, width, height, seed=0, exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)
    else:
        image.save(path)


def voc_object(name, box, difficult=0):
    x1, y1, x2, y2 = box
    return (f"  <object>\n    <name>{name}</name>\n    <difficult>{difficult}</difficult>\n    <bndbox>\n"
            f"      <xmin>{x1}</xmin>\n      <ymin>{y1}</ymin>\n      <xmax>{x2}</xmax>\n      <ymax>{y2}</ymax>\n"
            f"    </bndbox>\n  </object>\n")


def write_voc(root, objects_per_image, sizes):
    """``objects_per_image``: image id -> list of voc_object strings, or None for an image without an XML."""
    for image_id, objects in objects_per_image.items():
        width, height = sizes[image_id]
        write_image(root / "JPEGImages" / f"{image_id}.jpg", width, height, seed=len(image_id))
        if objects is not None:
            (root / "Annotations").mkdir(parents=True, exist_ok=True)
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation>\n  <filename>{image_id}.jpg</filename>\n  <size><width>{width}</width>"
                f"<height>{height}</height><depth>3</depth></size>\n" + "".join(objects) + "</annotation>\n")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(objects_per_image) + "\n")
    return root


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(tmp_path / "VOC", {
        "000001": [voc_object("cat", (11, 21, 30, 40)), voc_object("dog", (5, 5, 60, 44), difficult=1)],
        "000002": [voc_object("dog", (40, 10, 20, 30)),        # degenerate: xmax < xmin
                   voc_object("dog", (2, 3, 50, 40)), voc_object("bird", (1, 1, 10, 10))],  # bird: unknown
        "000003": [],                                           # an XML without objects
        "000004": None,                                         # no XML at all: a negative
    }, sizes={"000001": (64, 48), "000002": (70, 50), "000003": (64, 64), "000004": (48, 64)})


def convert(*args, check=True):
    """``python tools/convert_to_coco.py ARGS``: a real process where the exit status and stderr are
    the point (``check=False``), else in this process (its log captured) to spare a torch import."""
    if not check:
        return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_to_coco.py"), *map(str, args)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    converter = load_tool("convert_to_coco")
    stream = io.StringIO()
    handler, root = logging.StreamHandler(stream), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            converter.main(converter.get_args_parser().parse_args([str(a) for a in args]))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return Namespace(returncode=0, stdout=stream.getvalue(), stderr="")


def load(root, split="train"):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def train_two_iterations(data, out):
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--data-path", str(data),
                             "--output-dir", str(out), *TINY_TRAIN], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "anchor coverage: " in result.stdout + result.stderr
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_voc_converts_with_problems_skipped_and_trains(voc_root, tmp_path):
    out = tmp_path / "coco"
    result = convert("--format", "voc", "--input", voc_root, "--output", out, "--split", "train",
                     "--classes", "cat", "dog")
    log = result.stdout + result.stderr
    assert "000002.xml:" in log and "no area" in log and "'bird' is not in the class list" in log
    dataset = load(out)
    assert [c["name"] for c in dataset["categories"]] == ["cat", "dog"]
    assert len(dataset["images"]) == 4  # both negatives kept
    by_file = {image["file_name"]: image for image in dataset["images"]}
    assert (by_file["000004.jpg"]["width"], by_file["000004.jpg"]["height"]) == (48, 64)
    anns = dataset["annotations"]
    assert len(anns) == 3
    cat = next(a for a in anns if a["category_id"] == 1)
    assert cat["bbox"] == [10, 20, 20, 20] and cat["iscrowd"] == 0  # 1-based VOC pixels -> [x, y, w, h]
    difficult = [a for a in anns if a["image_id"] == by_file["000001.jpg"]["id"] and a["category_id"] == 2]
    assert len(difficult) == 1 and difficult[0]["iscrowd"] == 1
    assert os.path.islink(out / "train" / "000001.jpg")
    train_two_iterations(out, tmp_path / "run")

    kept = tmp_path / "kept"
    convert("--format", "voc", "--input", voc_root, "--output", kept, "--difficult", "keep", "--link", "copy")
    assert sum(a["iscrowd"] for a in load(kept)["annotations"]) == 0
    assert {c["name"] for c in load(kept)["categories"]} == {"bird", "cat", "dog"}  # discovered classes
    assert not os.path.islink(kept / "train" / "000001.jpg")


@pytest.mark.slow
def test_yolo_converts_with_problems_skipped_and_trains(tmp_path):
    root = tmp_path / "yolo"
    for index, (width, height) in enumerate([(64, 48), (80, 60), (64, 64)]):
        write_image(root / "images" / "train" / f"im{index}.png", width, height, seed=index)
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "im0.txt").write_text("0 0.5 0.5 0.25 0.5\n1 0.2 0.3 0.0 0.1\n\n")   # second: zero width
    (labels / "im1.txt").write_text("1 0.5 0.5 0.5 0.5\n7 0.5 0.5 0.1 0.1\n"      # 7: unknown class index
                                    "0 0.1 0.1 0.4 0.1 0.4 0.4 0.1 0.4\n")        # a polygon
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  - circle   # first\n  - 'box'\n")
    out = tmp_path / "coco"
    log = "".join(convert("--format", "yolo", "--input", root, "--output", out, "--split", "train").stdout)
    assert "im1.txt:2" in log and "class index 7" in log and "im0.txt:2" in log
    dataset = load(out)
    assert [c["name"] for c in dataset["categories"]] == ["circle", "box"]
    assert len(dataset["images"]) == 3  # im2 has no label file: a negative
    first = next(a for a in dataset["annotations"] if a["image_id"] == 1)
    assert first["bbox"] == [24, 12, 16, 24] and first["category_id"] == 1
    polygon = [a for a in dataset["annotations"] if a["image_id"] == 2 and a["category_id"] == 1]
    assert polygon[0]["bbox"] == pytest.approx([8, 6, 24, 18])
    assert len(dataset["annotations"]) == 3
    train_two_iterations(out, tmp_path / "run")


@pytest.mark.slow
def test_csv_converts_with_problems_skipped_and_trains(tmp_path):
    root = tmp_path / "csv"
    for index in range(3):
        write_image(root / "img" / f"{index}.jpg", 64, 48, seed=index)
    (root / "classes.csv").write_text("dog,1\ncat,0\n")
    (root / "train.csv").write_text("img/0.jpg,10,12,30,40,cat\nimg/0.jpg,5,5,20,30,dog\n"
                                    "img/1.jpg,,,,,\n"                 # an image without objects
                                    "img/2.jpg,30,10,30,20,cat\n"      # degenerate: x2 == x1
                                    "img/2.jpg,1,1,70,40,cat\n"        # reaches outside: clipped
                                    "img/2.jpg,1,1,9,9,horse\n")       # unknown class
    out = tmp_path / "coco"
    log = convert("--format", "csv", "--input", root / "train.csv", "--output", out, "--classes",
                  root / "classes.csv").stdout
    assert "train.csv:4" in log and "train.csv:6" in log
    dataset = load(out)
    assert [c["name"] for c in dataset["categories"]] == ["cat", "dog"]  # the ids of classes.csv give the order
    assert [image["file_name"] for image in dataset["images"]] == ["0.jpg", "1.jpg", "2.jpg"]
    assert [a["bbox"] for a in dataset["annotations"]] == [[10, 12, 20, 28], [5, 5, 15, 25], [1, 1, 63, 39]]
    train_two_iterations(out, tmp_path / "run")


def test_exif_rotated_images_get_their_displayed_size(tmp_path):
    root = tmp_path / "yolo"
    write_image(root / "images" / "a.jpg", 64, 32, exif_orientation=6)  # displayed 32 wide, 64 high
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.25\n")
    (root / "classes.txt").write_text("thing\n")
    convert("--format", "yolo", "--input", root, "--output", tmp_path / "coco")
    image = load(tmp_path / "coco")["images"][0]
    assert (image["width"], image["height"]) == (32, 64)
    dataset = coco_dataset.build_dataset(tmp_path / "coco", "train")
    picture, target = dataset[0]  # decodes without a size mismatch
    assert tuple(picture.shape[1:]) == (64, 32)
    assert target["boxes"].tolist() == [[8.0, 24.0, 24.0, 40.0]]


@pytest.mark.parametrize("fmt,content,where", [
    ("voc", "<annotation><object><name>cat</name>\n<bndbox><xmin>1</xmin></bndbox></object></annotation>",
     "000001.xml:1: <bndbox> has no <ymin>"),
    ("voc", "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>\n<xmax>oops</xmax>"
            "<ymax>3</ymax></bndbox></object></annotation>", "000001.xml:2: <xmax> 'oops' is not a number"),
    ("voc", "<annotation><object>\n<name>cat</name>\n</annotation>", "000001.xml:3: not valid XML (mismatched tag)"),
    ("yolo", "0 0.5 0.5 0.2\n", "a.txt:1: expected 'class cx cy w h'"),
    ("yolo", "0 0.5 0.5 0.2 0.2\n0 12 30 40 50\n", "a.txt:2: coordinates"),
    ("csv", "a.jpg,1,2,3,cat\n", "train.csv:1: expected 6 fields"),
    ("csv", "a.jpg,1,2,3,4,cat\na.jpg,1,,3,4,cat\n", "train.csv:2: give all of"),
])
def test_malformed_files_stop_with_their_file_and_line(tmp_path, fmt, content, where):
    if fmt == "voc":
        write_image(tmp_path / "in" / "JPEGImages" / "000001.jpg", 8, 8)
        (tmp_path / "in" / "Annotations").mkdir()
        (tmp_path / "in" / "Annotations" / "000001.xml").write_text(content)
        source = tmp_path / "in"
    elif fmt == "yolo":
        write_image(tmp_path / "in" / "images" / "a.jpg", 8, 8)
        (tmp_path / "in" / "labels").mkdir()
        (tmp_path / "in" / "labels" / "a.txt").write_text(content)
        (tmp_path / "in" / "classes.txt").write_text("cat\n")
        source = tmp_path / "in"
    else:
        write_image(tmp_path / "in" / "a.jpg", 8, 8)
        (tmp_path / "in" / "train.csv").write_text(content)
        source = tmp_path / "in" / "train.csv"
    with pytest.raises(ConversionError) as info:
        load_tool("convert_to_coco").main(Namespace(
            format=fmt, input=str(source), output=str(tmp_path / "out"), split="train", image_set=None, classes=None,
            difficult="ignore", link="symlink", overwrite=False, strict=False))
    assert where in str(info.value)
    assert not (tmp_path / "out" / "annotations").exists()


def test_a_malformed_file_is_one_line_from_the_command_line(tmp_path):
    (tmp_path / "in.csv").write_text("a.jpg,1,2,3,4\n")
    result = convert("--format", "csv", "--input", tmp_path / "in.csv", "--output", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'in.csv'}:1: expected 6 fields "
                                                  "path,x1,y1,x2,y2,class, got 5: 'a.jpg,1,2,3,4'"]


@pytest.mark.parametrize("text,expected", [
    ("names: [cat, 'dog, big', \"bird\"]\n", ["cat", "dog, big", "bird"]),
    ("names: {0: cat, 1: dog}\n", {0: "cat", 1: "dog"}),
    ("nc: 2\nnames:\n  - cat  # a comment\n  - 'dog'\ntrain: x\n", ["cat", "dog"]),
    ("names:\n  0: cat\n  1: 'hot dog'\n\nval: y\n", {0: "cat", 1: "hot dog"}),
])
def test_yaml_names_without_pyyaml(text, expected, tmp_path):
    assert parse_yaml_names(text, tmp_path / "data.yaml") == expected


def test_make_voc_example_round_trips_the_demo_boxes_through_the_converter(tmp_path):
    import zlib

    import av

    from utils.data.demo_shapes import DEMO_CATEGORIES, render_image
    voc, clip = tmp_path / "voc", tmp_path / "clip.mp4"
    load_tool("make_voc_example").main(Namespace(output=str(voc), num_train=4, num_val=2, image_size=64, seed=5,
                                                 preset=None, video=str(clip), fps=5))
    convert("--format", "voc", "--input", voc, "--output", tmp_path / "coco", "--split", "train")
    dataset = load(tmp_path / "coco")
    demo_id = {c["name"]: c["id"] for c in DEMO_CATEGORIES}
    name_of = {c["id"]: c["name"] for c in dataset["categories"]}
    assert len(dataset["images"]) == 4
    for index, image in enumerate(dataset["images"]):
        _, _, objects = render_image(np.random.default_rng([5, zlib.crc32(b"train"), index]), 64, 64)
        converted = [(a["bbox"], demo_id[name_of[a["category_id"]]]) for a in dataset["annotations"]
                     if a["image_id"] == image["id"]]
        assert sorted(converted) == sorted((o["bbox"], o["category_id"]) for o in objects)
    with av.open(str(clip)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 2 and (frames[0].width, frames[0].height) == (64, 64)


def test_make_voc_example_preset_draws_the_preset_images_of_the_demo_data(tmp_path):
    from utils.data.demo_data import generate_demo_dataset
    voc = tmp_path / "voc"
    load_tool("make_voc_example").main(Namespace(output=str(voc), num_train=3, num_val=1, image_size=None, seed=0,
                                                 preset="sparse", video=None, fps=5))
    convert("--format", "voc", "--input", voc, "--output", tmp_path / "coco", "--split", "train")
    generate_demo_dataset(str(tmp_path / "demo"), num_train=3, num_val=1, preset="sparse", show_progress=False)
    demo = load(tmp_path / "demo")
    converted = load(tmp_path / "coco")
    name_of = {c["id"]: c["name"] for c in converted["categories"]}
    demo_name = {c["id"]: c["name"] for c in demo["categories"]}
    assert [(i["width"], i["height"]) for i in converted["images"]] == [(i["width"], i["height"]) for i in demo["images"]]
    boxes = sorted((a["image_id"], a["bbox"], name_of[a["category_id"]]) for a in converted["annotations"])
    # the demo's visible-pixel boxes are whole pixels, so VOC's integer corners carry them exactly
    assert boxes and boxes == sorted((a["image_id"], a["bbox"], demo_name[a["category_id"]]) for a in demo["annotations"])
