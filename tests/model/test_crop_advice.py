"""Crop advice: given on small objects in large images, not on the demo's shapes; its coverage
and window are what the crop flags give; the memory model meets its calibration point."""
import pytest
import torch

import coco_dataset
from model.anchor_coverage import BoxSet, measure_coverage
from model.crop_advice import (AFFORDABLE_SIDE, MIN_WINDOW, crop_advice, step_memory_gib, suggest_crops,
                               tiny_share, window_size)
from recipes import resolve_config
from train_options import get_args_parser
from utils.data.demo_data import generate_demo_dataset


def demo_recipe_model(*flags):
    return resolve_config(get_args_parser().parse_args(["--recipe", "demo", *flags])).model


def large_image_arrays(num_images=4, seed=0):
    """``box_arrays()``-like dict: 12-30 px boxes on 1500-2500 px images, 40 per image."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1500, 2501, (num_images, 2), generator=generator).double()
    boxes, index = [], []
    for i, (height, width) in enumerate(sizes.tolist()):
        side = torch.randint(12, 31, (40, 2), generator=generator).float()
        corner = torch.rand(40, 2, generator=generator) * (torch.tensor([width, height]) - side)
        boxes.append(torch.cat([corner, corner + side], dim=1))
        index.append(torch.full((40,), i))
    return {"boxes": torch.cat(boxes).numpy(), "labels": torch.zeros(40 * num_images, dtype=torch.long).numpy(),
            "image_index": torch.cat(index).numpy(), "image_sizes": sizes.numpy()}


def test_small_objects_in_large_images_get_crop_flags_that_cover_them():
    arrays, config = large_image_arrays(), demo_recipe_model()
    box_set = BoxSet.from_arrays(arrays)
    assert measure_coverage(box_set, config).fg < 0.05  # 12-30 px objects shrunk to 1-2 px at 128 px
    suggestion = suggest_crops(box_set, config, batch_size=8)
    assert suggestion is not None and suggestion.coverage >= 0.9
    assert suggestion.affordable_coverage < 0.9  # even at longer side 1333 px they are 7-20 px
    # The coverage it states is the one its flags give, measured again from scratch.
    assert measure_coverage(box_set, config.replace(**suggestion.changes())).fg == pytest.approx(suggestion.coverage)
    assert suggestion.crop_size == window_size(box_set, config, suggestion.crop_scale) == MIN_WINDOW
    assert suggestion.tile_window == round(suggestion.crop_size / suggestion.crop_scale)
    line = crop_advice(arrays, config, batch_size=8)
    assert line is not None and " ".join(suggestion.flags()) in line and f"{suggestion.coverage:.1%}" in line
    assert f"tiles by default in {suggestion.tile_window} px windows" in line
    # Already on crops: nothing to advise.
    assert crop_advice(arrays, config.replace(**suggestion.changes()), batch_size=8) is None


def test_no_advice_on_the_demo_shapes(tmp_path):
    generate_demo_dataset(str(tmp_path / "demo"), num_train=40, num_val=1, image_size=160, seed=0,
                          show_progress=False)
    arrays = coco_dataset.build_dataset(tmp_path / "demo", "train").box_arrays()
    # 160 px images: at longer side 1333 px (8.3x) no object is under 16 px, whatever the coverage.
    assert tiny_share(BoxSet.from_arrays(arrays), demo_recipe_model()) == 0
    assert crop_advice(arrays, demo_recipe_model(), batch_size=8) is None


def test_tiny_share_takes_the_largest_affordable_size_of_each_image():
    # Two images: 2666 px (x0.5 at longer side 1333) and 4000 px (x1/3); the recipe's 128 px is smaller.
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [0.0, 0.0, 33.0, 33.0], [0.0, 0.0, 45.0, 45.0],
                          [0.0, 0.0, 50.0, 50.0]])
    box_set = BoxSet(boxes, torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]),
                     torch.tensor([[2666.0, 2666.0], [4000.0, 4000.0]], dtype=torch.float64))
    # 15, 16.5, 15 and 16.7 px at that size: two under 16 px.
    assert tiny_share(box_set, demo_recipe_model()) == 0.5


def test_window_holds_the_largest_boxes_twice_in_multiples_of_the_coarsest_stride():
    boxes = torch.tensor([[0.0, 0.0, 200.0, 50.0]] * 10)
    box_set = BoxSet(boxes, torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long),
                     torch.tensor([[3000.0, 3000.0]], dtype=torch.float64))
    config = demo_recipe_model()  # P3-P6: coarsest stride 64, size_divisible 128
    assert window_size(box_set, config, crop_scale=1.0) == 512      # 2 x 200 = 400 -> 512
    assert window_size(box_set, config, crop_scale=0.5) == MIN_WINDOW
    assert window_size(box_set, config, crop_scale=4.0) == 1024     # capped


def test_memory_model_meets_its_calibration_point_and_grows_with_pixels():
    assert step_memory_gib(896, 1408, 16) * 1024 == pytest.approx(10768)
    small, large = step_memory_gib(256, 256, 8), step_memory_gib(512, 512, 8)
    assert small < large < 4 * small  # the fixed part (weights, optimizer state) does not grow
    assert AFFORDABLE_SIDE == 1333
