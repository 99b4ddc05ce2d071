"""Sliced inference (model/tiling.py, model/tile_merge.py): window positions, padding, seams, the merges
against trusted references, equality with plain inference, inference.py's defaults and mistakes, the benchmark."""
import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torchvision.ops import batched_nms

import inference
from benchmarks import tiling_benchmark
from colour_detector import detect_colours
from forked_scripts import run_forked
from model import ModelConfig, RetinaNet
from model.tile_merge import merge_detections
from model.tiling import (TiledDetector, TileOptions, axis_positions, tile_detector, tile_positions,
                          tile_stride)
from test_video import make_clip
from utils.runtime.checkpoint import save_checkpoint
from utils.runtime.errors import ConfigError

CATEGORIES = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # label k <-> colour k
GREY = 128


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("height,width,tile,overlap,expected", [
    # stride round(64 * 0.75) = 48: 0, 48 and the flush 150 - 64 = 86; 100 - 64 = 36 is not a multiple of 48
    (100, 150, 64, 0.25, [(top, left) for top in (0, 36) for left in (0, 48, 86)]),
    (64, 170, 64, 0.5, [(0, left) for left in (0, 32, 64, 96, 106)]),   # stride 32, one row (H = tile)
    (112, 40, 64, 0.25, [(0, 0), (48, 0)]),   # 112 - 64 = 48 = one stride: no duplicate last window
    (30, 20, 64, 0.25, [(0, 0)]),              # smaller than the tile: one (padded) window
    (120, 120, 50, 0.0, [(t, l) for t in (0, 50, 70) for l in (0, 50, 70)]),
])
def test_tile_positions_hand_computed(height, width, tile, overlap, expected):
    assert tile_positions(height, width, tile, overlap) == expected


def test_stride_rounds_half_up():
    assert tile_stride(50, 0.25) == 38 and tile_stride(64, 0.25) == 48 and tile_stride(256, 0.0) == 256


@given(length=st.integers(1, 3000), tile=st.integers(32, 700), overlap=st.floats(0, 0.95))
def test_windows_cover_every_pixel_and_the_last_is_flush(length, tile, overlap):
    stride = tile_stride(tile, overlap)
    positions = axis_positions(length, tile, stride)
    assert positions[0] == 0
    if length <= tile:
        assert positions == [0]
        return
    assert positions[-1] == length - tile  # flush with the border, never past it
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    assert all(0 < gap <= stride for gap in gaps) and gaps[:-1] == [stride] * (len(gaps) - 1)
    covered = torch.zeros(length, dtype=torch.bool)
    for start in positions:
        covered[start:start + tile] = True
    assert covered.all()


class Recorder:
    """Eval interface that records the windows it is given and detects nothing."""

    def __init__(self, config=None):
        self.config, self.windows = config or {}, []

    def __call__(self, images):
        self.windows += [image.clone() for image in images]
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]


def test_small_image_is_padded_with_the_mean_colour_never_stretched():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    recorder = Recorder({"image_mean": [0.485, 0.456, 0.406]})
    TiledDetector(recorder, tile=64)([image, image.float() / 255])
    uint8_window, float_window = recorder.windows
    assert uint8_window.shape == float_window.shape == (3, 64, 64)
    assert torch.equal(uint8_window[:, :40, :50], image)
    mean = torch.tensor([124, 116, 104], dtype=torch.uint8).view(3, 1, 1)  # round(mean * 255)
    assert (uint8_window[:, 40:] == mean).all() and (uint8_window[:, :, 50:] == mean).all()
    assert torch.allclose(float_window[:, 40:], mean.float() / 255)
    # a wide strip: three full-size windows along its width, each padded below
    TiledDetector(recorder, tile=64, overlap=0.25)([torch.zeros(3, 40, 150, dtype=torch.uint8)])
    assert [tuple(w.shape) for w in recorder.windows[2:]] == [(3, 64, 64)] * 3


# ---------------------------------------------------------------- seams

class ColourDetector:
    """Detects the pixels of each colour of COLOURS in a window: label k, the bounding box of what is
    visible of the object (clipped by the window), score 0.9. No training, exact boxes."""

    config = {}
    nms_thresh, detections_per_img = 0.5, 100

    def __call__(self, images):
        return [detect_colours(image, COLOURS) for image in images]


def scene_with(objects: dict, height=150, width=170) -> torch.Tensor:
    """Grey image with a filled rectangle per ``label: (x1, y1, x2, y2)``, in colour ``COLOURS[label]``."""
    image = torch.full((3, height, width), GREY, dtype=torch.uint8)
    for label, (x1, y1, x2, y2) in objects.items():
        image[:, y1:y2, x1:x2] = torch.tensor(COLOURS[label], dtype=torch.uint8).view(3, 1, 1)
    return image


def as_set(output: dict) -> set:
    return {(int(label), tuple(box)) for box, label in zip(output["boxes"].tolist(), output["labels"].tolist())}


# Tile 64, overlap 0.5: windows at x 0, 32, 64, 96, 106 and y 0, 32, 64, 86; every object is at most
# 32 - 2 * 2 = 28 px, so each lies whole in some window and is reported once with its full box.
SEAM_OBJECTS = {0: (50, 20, 70, 40),     # straddles x = 64, where the windows at x 0 and 64 meet
                1: (90, 60, 115, 80),    # straddles a corner: vertical and horizontal seams
                2: (30, 90, 55, 112),    # straddles horizontal seams
                3: (140, 5, 160, 25)}    # in the last, flush column


@pytest.mark.parametrize("merge", ["nms", "greedy"])
def test_an_object_straddling_a_seam_is_reported_once_with_its_full_box(merge):
    image = scene_with(SEAM_OBJECTS)
    detector = ColourDetector()
    pieces = [output for top, left in tile_positions(150, 170, 64, 0.5)
              for output in detector([image[:, top:top + 64, left:left + 64]])]
    assert sum(len(p["scores"]) for p in pieces) > 2 * len(SEAM_OBJECTS)  # the windows do see cut pieces
    result = TiledDetector(detector, tile=64, overlap=0.5, merge=merge)([image])[0]
    assert as_set(result) == {(label, tuple(float(v) for v in box)) for label, box in SEAM_OBJECTS.items()}


def test_objects_larger_than_the_overlap_greedy_merge_and_the_whole_image_pass():
    def found(image, overlap, merge, whole_image=False):
        return as_set(TiledDetector(ColourDetector(), tile=64, overlap=overlap, merge=merge,
                                    whole_image=whole_image)([image])[0])

    # 80 px, whole in no 64 px window: NMS reports the pieces (the documented limit); with overlap 0.5
    # they overlap enough for the greedy merge to reunite them.
    image = scene_with({0: (20, 30, 100, 110)})
    assert len(found(image, 0.5, "nms")) > 1
    assert found(image, 0.5, "greedy") == {(0, (20.0, 30.0, 100.0, 110.0))}
    # 120 px with overlap 0.25: the pieces barely overlap; the whole-image pass brings the whole box,
    # which the greedy merge grows over all of them.
    image = scene_with({0: (20, 30, 140, 140)})
    assert len(found(image, 0.25, "greedy")) > 1
    assert found(image, 0.25, "greedy", whole_image=True) == {(0, (20.0, 30.0, 140.0, 140.0))}


# ---------------------------------------------------------------- merges against references

def random_detections(count: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, generator=generator) * 400
    sizes = 5 + torch.rand(count, 2, generator=generator) * 60
    return {"boxes": torch.cat([corners, corners + sizes], 1), "scores": torch.rand(count, generator=generator),
            "labels": torch.randint(0, 3, (count,), generator=generator)}


def greedy_reference(detections: dict, thresh: float) -> set:
    """Greedy merging written the obvious way (all pairs, pass after pass until nothing matches): the
    reference for the grid version."""
    boxes, scores, labels = (detections[key].tolist() for key in ("boxes", "scores", "labels"))

    def smaller_share(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        return inter / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))

    while True:
        def priority(i):  # best score first, the larger box first among equal scores
            return -scores[i], -(boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])

        order = sorted(range(len(boxes)), key=priority)
        claimed, groups = set(), []
        for i in order:
            if i in claimed:
                continue
            group = [i] + [j for j in order if j != i and j not in claimed and labels[j] == labels[i]
                           and smaller_share(boxes[i], boxes[j]) > thresh]
            claimed.update(group)
            groups.append(group)
        if len(groups) == len(boxes):
            return {(labels[i], round(scores[i], 6), tuple(round(v, 3) for v in boxes[i])) for i in range(len(boxes))}
        boxes = [[min(boxes[j][0] for j in g), min(boxes[j][1] for j in g), max(boxes[j][2] for j in g),
                  max(boxes[j][3] for j in g)] for g in groups]
        scores, labels = [scores[g[0]] for g in groups], [labels[g[0]] for g in groups]


@pytest.mark.parametrize("count,seed", [(0, 0), (1, 0), (300, 1), (1500, 2)])
def test_nms_merge_keeps_what_batched_nms_keeps(count, seed):
    detections = random_detections(count, seed)
    # a few boxes larger than the grid cell limit (whole-image detections) join in
    large = min(3, count)
    detections["boxes"][:large] = torch.tensor([0.0, 0, 460, 460]) * torch.rand(large, 1).clamp(min=0.5)
    merged = merge_detections(detections, method="nms", iou_thresh=0.5, cell_limit=100)
    keep = batched_nms(detections["boxes"], detections["scores"], detections["labels"], 0.5)
    assert sorted(merged["scores"].tolist()) == sorted(detections["scores"][keep].tolist())


@pytest.mark.parametrize("count,seed", [(200, 3), (600, 4)])
def test_greedy_merge_equals_the_all_pairs_reference(count, seed):
    detections = random_detections(count, seed)
    merged = merge_detections(detections, method="greedy", iou_thresh=0.5, match_thresh=0.5, cell_limit=100)
    found = {(int(label), round(score, 6), tuple(round(v, 3) for v in box)) for box, score, label in
             zip(merged["boxes"].tolist(), merged["scores"].tolist(), merged["labels"].tolist())}
    assert found == greedy_reference(detections, 0.5)
    assert len(found) < count  # something was merged


# ---------------------------------------------------------------- a real model

def crop_model(crop_size: int, crop_scale: float = 1.0, **changes) -> RetinaNet:
    torch.manual_seed(0)
    """A tiny random model trained (as its config says) on crop_size crops; crop_size 0: on whole images
    at 64-96 px."""
    config = ModelConfig(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, prior_prob=0.5,
                         crop_size=crop_size, crop_scale=crop_scale, min_size=crop_size or 64,
                         max_size=crop_size or 96, size_divisible=32, **changes)
    return RetinaNet.from_config(config).eval()


def test_a_window_covering_the_whole_image_equals_plain_inference():
    model = crop_model(96)
    images = [torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
              for s in (1, 2)]
    detector = tile_detector(model)  # crop-trained: tiles by default, with its own 96 px window
    assert isinstance(detector, TiledDetector) and detector.tile == 96
    with torch.no_grad():
        plain = model(images)
    tiled = detector(images)
    for expected, found in zip(plain, tiled):
        assert len(expected["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(expected[key], found[key]), key


def test_default_window_follows_crop_size_and_scale():
    assert tile_detector(crop_model(64, 0.5)).tile == 128   # 64 px crops of images at half size
    model = crop_model(0)
    assert tile_detector(model) is model                    # whole-image model: no tiling
    assert not isinstance(tile_detector(crop_model(64), TileOptions(tile=0)), TiledDetector)


@pytest.mark.parametrize("options,message", [
    (dict(overlap=1.0), r"--tile-overlap must lie in \[0, 1\), got 1.0"),
    (dict(overlap=-0.1), r"--tile-overlap must lie in \[0, 1\)"),
    (dict(tile=16), r"--tile 16: windows must be at least 32 px"),
    (dict(tile=40, overlap=0.99), r"leaves a stride under 1 px"),
    (dict(tile=-1), r"--tile must be >= 0"),
    (dict(merge="mean"), r"--tile-merge must be one of nms, greedy"),
])
def test_bad_tile_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        TileOptions(**options)


# ---------------------------------------------------------------- inference.py

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A crop-trained (64 px windows), a whole-image and a non-square fixed_size checkpoint, and a folder
    with one 150 x 100 (W x H) image."""
    folder = tmp_path_factory.mktemp("tiling")
    models = {"crop": crop_model(64), "whole": crop_model(0),
              "fixed": crop_model(0, fixed_size=(64, 96))}
    paths = {}
    for name, model in models.items():
        paths[name] = folder / f"{name}.pth"
        save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                         "args": {}}, str(paths[name]))
    images = folder / "images"
    images.mkdir()
    pixels = torch.randint(0, 256, (100, 150, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    Image.fromarray(pixels.numpy()).save(images / "big.png")
    return {**paths, "images": images}


def run_inference(*argv):
    return inference.main(inference.get_args_parser().parse_args([str(a) for a in argv]))


def detections(output_dir) -> list:
    return json.loads((output_dir / "detections.json").read_text())[0]["detections"]


def test_a_crop_trained_checkpoint_tiles_by_default_and_tile_0_turns_it_off(checkpoints, tmp_path):
    common = ["--checkpoint", checkpoints["crop"], "--input", checkpoints["images"], "--workers", "0",
              "--device", "cpu", "--score-threshold", "0.3"]
    default = run_inference(*common, "--output-dir", tmp_path / "default")
    explicit = run_inference(*common, "--output-dir", tmp_path / "explicit", "--tile", "64")
    off = run_inference(*common, "--output-dir", tmp_path / "off", "--tile", "0")
    assert (default["tile"], explicit["tile"], off["tile"]) == (64, 64, 0)
    assert detections(tmp_path / "default") == detections(tmp_path / "explicit")
    assert detections(tmp_path / "default") != detections(tmp_path / "off")
    assert all(0 <= d["box"][0] <= d["box"][2] <= 150 and 0 <= d["box"][1] <= d["box"][3] <= 100
               for d in detections(tmp_path / "default"))
    whole = run_inference(*common, "--output-dir", tmp_path / "whole", "--tile-whole-image", "--tile-merge", "greedy",
                          "--tile-max-detections", "5")
    assert whole["tile"] == 64 and 0 < len(detections(tmp_path / "whole")) <= 5


def test_videos_tile_too(checkpoints, tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", num_frames=3)  # 65 x 49: two windows of 64, padded below
    frames = {}
    for tile in (None, "0"):
        out = tmp_path / f"tile_{tile}"
        summary = run_inference("--checkpoint", checkpoints["crop"], "--input", clip, "--output-dir", out,
                                "--workers", "0", "--score-threshold", "0.3", *(["--tile", tile] if tile else []))
        assert summary["tile"] == (64 if tile is None else 0) and summary["videos"][0]["num_frames"] == 3
        frames[tile] = json.loads((out / "clip_frames.json").read_text())["frames"]
    tiled = frames[None][0]["detections"]
    assert tiled and all(0 <= d["box"][0] <= d["box"][2] <= 65 and 0 <= d["box"][1] <= d["box"][3] <= 49
                         for d in tiled)
    assert tiled != frames["0"][0]["detections"]


@pytest.mark.slow  # one process forked per case: seconds
def test_tile_mistakes_stop_with_one_line(checkpoints, tmp_path):
    def argv(checkpoint, *flags):
        return ["--checkpoint", checkpoints[checkpoint], "--input", checkpoints["images"], "--workers", "0",
                "--output-dir", tmp_path / "out", "--overwrite", *flags]

    cases = [
        (argv("crop", "--tile-overlap", "1"), r"--tile-overlap must lie in \[0, 1\), got 1.0"),
        (argv("crop", "--tile-overlap", "-0.2"), r"--tile-overlap must lie in \[0, 1\)"),
        (argv("crop", "--tile", "16"), r"--tile 16: windows must be at least 32 px"),
        (argv("whole", "--tile", "40", "--tile-overlap", "0.99"), r"stride under 1 px"),
        (argv("whole", "--tile-overlap", "0.3"), r"--tile-overlap needs tiling, which is off \(the model was trained "
                                                 r"on whole images"),
        (argv("crop", "--tile", "0", "--tile-whole-image"), r"--tile-whole-image needs tiling, which is off "
                                                            r"\(--tile 0\)"),
        (argv("fixed", "--tile", "64"), r"resizes every input to 64 x 96 \(fixed_size\).*cannot tile"),
    ]
    runs = run_forked("inference.py", [case for case, _ in cases])
    for (case, pattern), run in zip(cases, runs):
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and "Traceback" not in run.stderr, (case, run.stderr[-2000:])
        assert lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), (case, lines[-1])
        assert len([line for line in lines if line.startswith("error: ")]) == 1


# ---------------------------------------------------------------- benchmark

def test_tiling_benchmark_runs_at_a_toy_size(tmp_path):
    args = tiling_benchmark.get_args_parser().parse_args(
        ["--image-size", "150", "200", "--crop-size", "64", "--fpn-channels", "32", "--threads", "2",
         "--output-dir", str(tmp_path)])
    report = tiling_benchmark.main(args)
    saved = json.loads((tmp_path / "tiling_cpu_150x200.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["conditions"]["windows"] == len(tile_positions(150, 200, 64, 0.25)) == 12
    results = saved["results"]
    assert results["windows_per_s"] > 0 and results["peak_rss_mib"] >= results["rss_before_mib"]
    assert (tmp_path / "tiling_cpu_150x200.md").read_text().startswith("# Sliced inference: 150 x 200")
