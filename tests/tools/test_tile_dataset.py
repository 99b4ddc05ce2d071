"""tools/tile_dataset.py: tile positions, boxes clipped or ignored by hand, and a tiled split that
coco_dataset reads back with its pixels where the source had them."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import coco_dataset
from utils.runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("tile_dataset_under_test", REPO / "tools" / "tile_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tile_dataset = load_tool()


@pytest.mark.parametrize("length,tile,stride,expected", [
    (1000, 512, 410, [0, 410, 488]),   # the last one flush with the border, not past it
    (1024, 512, 512, [0, 512]),
    (512, 512, 410, [0]),
    (300, 512, 410, [0]),              # smaller than a tile: one tile of the image's size
    (1100, 512, 256, [0, 256, 512, 588]),
])
def test_positions_cover_the_side_and_end_flush(length, tile, stride, expected):
    assert tile_dataset._positions(length, tile, stride) == expected


def test_boxes_are_kept_clipped_or_ignored_by_their_visible_share():
    boxes = np.array([[110, 120, 130, 140],     # inside
                      [190, 100, 230, 120],     # x 190-200 of 190-230 inside: 25 % -> ignored
                      [170, 100, 210, 120],     # 30 of 40 inside: 75 % -> kept, clipped
                      [300, 300, 320, 320],     # outside
                      [150, 150, 250, 250]],    # a crowd region, partly inside -> ignored
                     dtype=np.float32)
    crowd = np.array([False, False, False, False, True])
    keep, ignore, clipped = tile_dataset.tile_annotations(boxes, crowd, (100, 100, 200, 200), min_visible=0.5)
    assert keep.tolist() == [True, False, True, False, False]
    assert ignore.tolist() == [False, True, False, False, True]
    np.testing.assert_array_equal(clipped[[0, 1, 2, 4]], [[10, 20, 30, 40], [90, 0, 100, 20], [70, 0, 100, 20],
                                                          [50, 50, 100, 100]])


def write_dataset(root):
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / "a.png")
    annotations = [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
                   {"id": 2, "image_id": 7, "category_id": 3, "bbox": [190, 50, 40, 20], "area": 800, "iscrowd": 0}]
    (root / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.png", "width": 500, "height": 300}], "annotations": annotations,
        "categories": [{"id": 3, "name": "car"}]}))
    return pixels


def test_tiled_split_reads_back_with_the_source_pixels_and_boxes(tmp_path):
    pixels = write_dataset(tmp_path / "big")
    args = SimpleNamespace(data_path=str(tmp_path / "big"), split="train", output=str(tmp_path / "tiles"), tile=200,
                           overlap=0.0, min_visible=0.5, drop_empty=False)
    summary = tile_dataset.main(args)
    # x: 0, 200, 300 (flush); y: 0, 100 (flush): 6 tiles of 200 x 200.
    tiles = coco_dataset.build_dataset(tmp_path / "tiles", "train")
    assert summary["num_tiles"] == len(tiles) == 6
    records = json.loads((tmp_path / "tiles" / "annotations" / "instances_train.json").read_text())["images"]
    for index, record in enumerate(records):
        image, target = tiles[index]
        x, y = record["tile_x"], record["tile_y"]
        assert record["source_image_id"] == 7 and image.shape == (3, 200, 200)
        torch.testing.assert_close(image, torch.from_numpy(pixels[y:y + 200, x:x + 200]).permute(2, 0, 1))
        if (x, y) == (0, 0):   # the first box whole; 25 % of the second (x 190-200 of 190-230): ignored
            torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 10.0, 30.0, 30.0]]))
            torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[190.0, 50.0, 200.0, 70.0]]))
        if (x, y) == (200, 0):  # 75 % of the second box: kept, clipped
            torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 50.0, 30.0, 70.0]]))
    assert summary["num_boxes"] == 2 and summary["num_ignored"] == 1  # no tile of row y=100 reaches y < 100


def test_bad_options_are_one_line_errors(tmp_path):
    args = SimpleNamespace(data_path=str(tmp_path), split="train", output=str(tmp_path / "o"), tile=256,
                           overlap=1.0, min_visible=0.5, drop_empty=False)
    with pytest.raises(ConfigError, match="--overlap"):
        tile_dataset.main(args)
