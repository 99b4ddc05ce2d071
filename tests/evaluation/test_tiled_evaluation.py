"""Evaluation over tiles: engine.evaluate tiles a crop-trained model by default, and evaluation.py's
tile mistakes are one line (CPU, seconds)."""
import pytest
import torch

from coco_files import write_coco_split
from colour_detector import detect_colours
from engine import evaluate
from forked_scripts import run_forked
from model.tiling import TileOptions

IMAGES = [(1, 200, 150), (2, 200, 150)]
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}]

# Sliced evaluation: small objects on seams of a crop-trained model's windows (128 px: windows at x 0
# and 72, y 0 and 22 on a 200 x 150 image), painted in their category's colour.
TILE_BOXES = [(1, 3, [60.0, 20.0, 30.0, 30.0]), (1, 7, [110.0, 100.0, 40.0, 30.0]),
              (1, 12, [150.0, 60.0, 25.0, 25.0]), (2, 3, [10.0, 10.0, 20.0, 20.0])]
TILE_COLOURS = {3: (255, 0, 0), 7: (0, 255, 0), 12: (0, 0, 255)}


class CropTrainedColourModel(torch.nn.Module):
    """Stands in for a model trained on 128 px crops: finds each category's colour in its input (the box
    of what is visible, clipped by the window) and records the sizes it was given."""

    config = {"crop_size": 128, "crop_scale": 1.0}

    def __init__(self):
        super().__init__()
        self.input_sizes = []

    def forward(self, images):
        self.input_sizes += [tuple(image.shape[1:]) for image in images]
        return [detect_colours(image, list(TILE_COLOURS.values())) for image in images]


def test_evaluate_tiles_a_crop_trained_model_by_default(tmp_path):
    coco_gt = write_coco_split(tmp_path / "coco", "val", IMAGES, TILE_BOXES, CATEGORIES)
    images = []
    for image_id in (1, 2):
        pixels = torch.full((3, 150, 200), 128, dtype=torch.uint8)
        for _, category_id, (x, y, w, h) in (box for box in TILE_BOXES if box[0] == image_id):
            pixels[:, int(y):int(y + h), int(x):int(x + w)] = torch.tensor(TILE_COLOURS[category_id]).view(3, 1, 1)
        images.append(pixels)
    batches = [(images, [{"image_id": 1}, {"image_id": 2}])]
    model = CropTrainedColourModel()
    metrics = evaluate(model, batches, coco_gt, [3, 7, 12], "cpu", show_progress=False)  # as train.py calls it
    assert set(model.input_sizes) == {(128, 128)} and len(model.input_sizes) == 8  # 2 x 2 windows per image
    assert metrics["AP"] == pytest.approx(1.0)  # every object once, with its full box
    model.input_sizes.clear()
    evaluate(model, batches, coco_gt, [3, 7, 12], "cpu", show_progress=False, tiling=TileOptions(tile=0))
    assert model.input_sizes == [(150, 200), (150, 200)]


@pytest.mark.slow  # a forked process: seconds
def test_evaluation_cli_tile_mistakes_are_one_line(tmp_path):
    cases = [(["--checkpoint", tmp_path / "none.pth", "--tile-overlap", "1.5"], "--tile-overlap must lie in [0, 1)"),
             (["--results", tmp_path / "r.json", "--tile", "64"], "--tile flags choose how a model runs")]
    for (argv, message), run in zip(cases, run_forked("evaluation.py", [argv for argv, _ in cases])):
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
