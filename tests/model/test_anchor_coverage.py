"""Anchor coverage: the nearest-grid-point shortcut against the full anchor grid, the training
resize and feature sizes against the model's own, and the suggestion on small objects."""
import pytest
import torch

from model import RetinaNet
from model.anchor_coverage import (BoxSet, best_anchor_iou, feature_grid, measure_coverage, suggest_settings,
                                   summary_line, training_image_sizes)
from model.anchors import AnchorGenerator, default_anchor_sizes
from model.config import ModelConfig
from model.transform import ImageBatcher
from utils.boxes.box_ops import box_iou


def random_boxes(num, height, width, generator, max_side=None):
    max_side = max_side or min(height, width)
    size = torch.rand(num, 2, generator=generator) * (max_side - 2) + 2
    corner = torch.rand(num, 2, generator=generator) * (torch.tensor([width, height]) - size)
    return torch.cat([corner, corner + size], dim=1)


@pytest.mark.parametrize("num_levels,size_divisible,ratios,spo", [(5, 128, (0.5, 1.0, 2.0), 3),
                                                                  (4, 32, (1.0,), 2), (3, 1, (0.25, 1.0, 3.0), 1)])
def test_best_anchor_iou_equals_the_maximum_over_the_full_grid(num_levels, size_divisible, ratios, spo):
    generator = torch.Generator().manual_seed(num_levels)
    anchors = AnchorGenerator(default_anchor_sizes((16, 32, 64, 128, 256)[:num_levels], spo), ratios)
    for height, width in [(200, 330), (97, 61), (256, 256)]:
        padded = (-(-height // size_divisible) * size_divisible, -(-width // size_divisible) * size_divisible)
        grid, _ = feature_grid(torch.tensor([padded]), num_levels)
        full = anchors(padded, [tuple(cells) for cells in grid[0].tolist()])
        boxes = torch.cat([random_boxes(300, height, width, generator, max_side=40),
                           random_boxes(100, height, width, generator)])
        expected = box_iou(boxes, full).max(dim=1).values
        fast = best_anchor_iou(boxes, torch.tensor([padded]).expand(len(boxes), 2), anchors)
        torch.testing.assert_close(fast, expected, rtol=0, atol=1e-6)


def test_feature_grid_matches_the_model_feature_maps():
    config = ModelConfig(num_classes=2, backbone="resnet18", fpn_channels=8, head_convs=0, num_extra_levels=2,
                         size_divisible=32)
    model = RetinaNet.from_config(config).eval()
    for padded in [(96, 160), (224, 64)]:
        with torch.no_grad():
            features = model.fpn(model.backbone(torch.zeros(1, 3, *padded)))
        cells, strides = feature_grid(torch.tensor([padded]), len(features))
        assert cells[0].tolist() == [list(f.shape[-2:]) for f in features]
        assert strides[0].tolist() == [[padded[0] // f.shape[-2], padded[1] // f.shape[-1]] for f in features]


@pytest.mark.parametrize("min_size,max_size,fixed", [(800, 1333, None), (128, 128, None), (600, 1000, (300, 200))])
def test_training_image_sizes_match_the_model_resize(min_size, max_size, fixed):
    config = ModelConfig(min_size=min_size, max_size=max_size, fixed_size=fixed)
    batcher = ImageBatcher(min_size=min_size, max_size=max_size, fixed_size=fixed).train()
    sizes = [(480, 640), (333, 517), (160, 160), (1000, 90)]
    expected = [list(batcher([torch.zeros(3, h, w)])[1][0]) for h, w in sizes]
    assert training_image_sizes(torch.tensor(sizes, dtype=torch.float64), config).long().tolist() == expected


def small_object_boxes(num_images=20, image_size=800, seed=0):
    """10-14 px squares-ish boxes on ``image_size`` px images."""
    generator = torch.Generator().manual_seed(seed)
    boxes, index = [], []
    for i in range(num_images):
        side = torch.randint(10, 15, (8, 2), generator=generator).float()
        corner = torch.rand(8, 2, generator=generator) * (image_size - 20)
        boxes.append(torch.cat([corner, corner + side], dim=1))
        index.append(torch.full((8,), i))
    return BoxSet(torch.cat(boxes), torch.zeros(8 * num_images, dtype=torch.long), torch.cat(index),
                  torch.full((num_images, 2), float(image_size), dtype=torch.float64))


def test_small_objects_are_poorly_covered_and_the_suggestion_fixes_it():
    box_set, config = small_object_boxes(), ModelConfig()
    coverage = measure_coverage(box_set, config)
    assert coverage.fg < 0.1  # 10-14 px boxes against 32 px anchors: IoU at most 14^2 / 32^2 = 0.19
    assert coverage.by_size()[0][2] == len(box_set.boxes)  # all in the < 16 px range at 800 px
    suggestion = suggest_settings(box_set, config)
    assert suggestion is not None and suggestion.coverage >= 0.9
    assert measure_coverage(box_set, config.replace(**suggestion.changes)).fg == pytest.approx(suggestion.coverage)
    line = summary_line(coverage, suggestion)
    assert "try --" in line and f"{coverage.fg:.1%}" in line


def test_well_covered_boxes_get_no_suggestion():
    generator = torch.Generator().manual_seed(0)
    boxes = []
    for base in (32, 64, 128, 256):  # squares exactly at anchor sizes, centred on the stride-8 grid
        centre = torch.randint(1, 40, (10, 2), generator=generator).float() * 16
        boxes.append(torch.cat([centre - base / 2, centre + base / 2], dim=1).clamp(0, 800))
    boxes = torch.cat(boxes)
    box_set = BoxSet(boxes, torch.zeros(len(boxes), dtype=torch.long), torch.zeros(len(boxes), dtype=torch.long),
                     torch.tensor([[800.0, 800.0]], dtype=torch.float64))
    coverage = measure_coverage(box_set, ModelConfig(max_size=800))
    assert coverage.fg >= 0.9
    assert suggest_settings(box_set, ModelConfig(max_size=800)) is None


def test_crop_coverage_measures_boxes_at_the_crop_scale_not_the_training_size():
    # A 16 px square centred on a P3 grid point: x2 it is the 32 px anchor itself (IoU 1). A 10 px
    # square: x2 it is 20 px, inside the smallest anchor (32 px) at best: IoU 20^2 / 32^2.
    boxes = torch.tensor([[100.0, 100.0, 116.0, 116.0], [300.0, 300.0, 310.0, 310.0]])
    box_set = BoxSet(boxes, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                     torch.tensor([[800.0, 1000.0]], dtype=torch.float64))
    crops = ModelConfig(crop_size=256, crop_scale=2.0, min_size=256, max_size=256)
    assert training_image_sizes(box_set.image_sizes, crops).tolist() == [[1600.0, 2000.0]]
    coverage = measure_coverage(box_set, crops)
    torch.testing.assert_close(coverage.best_iou, torch.tensor([1.0, 400 / 1024]), rtol=0, atol=1e-6)
    torch.testing.assert_close(coverage.box_size, torch.tensor([32.0, 20.0]))
    assert coverage.fg == 0.5
    # At scale 1: 16 px inside the 32 px square; 10 px inside the 46 x 22 anchor (32 px at ratio 0.5, rounded).
    native = measure_coverage(box_set, crops.replace(crop_scale=1.0))
    torch.testing.assert_close(native.best_iou, torch.tensor([256 / 1024, 100 / (46 * 22)]), rtol=0, atol=1e-6)
    # Whole images at min_size 256 would shrink them 3.1x: the crop path never resizes to min_size.
    assert measure_coverage(box_set, crops.replace(crop_size=0)).box_size.max() < 6


def test_crop_coverage_equals_the_full_grid_of_the_scaled_image():
    generator = torch.Generator().manual_seed(1)
    boxes = random_boxes(200, 300, 400, generator, max_side=40)
    box_set = BoxSet(boxes, torch.zeros(200, dtype=torch.long), torch.zeros(200, dtype=torch.long),
                     torch.tensor([[300.0, 400.0]], dtype=torch.float64))
    config = ModelConfig(crop_size=256, crop_scale=1.5, anchor_base_sizes=(16, 32, 64, 128, 256))
    padded = (512, 640)  # 450 x 600 padded to 128
    grid, _ = feature_grid(torch.tensor([padded]), 5)
    anchors = AnchorGenerator(default_anchor_sizes(config.anchor_base_sizes, 3), config.aspect_ratios)
    full = anchors(padded, [tuple(cells) for cells in grid[0].tolist()])
    expected = box_iou(boxes * 1.5, full).max(dim=1).values
    torch.testing.assert_close(measure_coverage(box_set, config).best_iou, expected, rtol=0, atol=1e-6)


def test_suggestion_for_a_crop_trained_model_changes_the_crop_scale_not_min_size():
    box_set = small_object_boxes(num_images=4, image_size=2000)  # 10-14 px at native resolution
    config = ModelConfig(crop_size=256, crop_scale=1.0, min_size=256, max_size=256)
    suggestion = suggest_settings(box_set, config)
    assert suggestion is not None and "min_size" not in suggestion.changes
    assert measure_coverage(box_set, config.replace(**suggestion.changes)).fg == pytest.approx(suggestion.coverage)
