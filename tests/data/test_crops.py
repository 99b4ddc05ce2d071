"""Crop training's windows (utils/data/crops.py) and the augmentations for top-down imagery
(utils/data/transforms.py): pixels and boxes exact, hand-computed."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import coco_dataset
from model.transform import IMAGENET_MEAN, IMAGENET_STD
from utils.data.crops import CropDataset, CropSettings, crop_window, mean_fill, windows_per_image
from utils.data.loaders import SeededDataset
from utils.data.transforms import (ColourJitter, Compose, RandomHorizontalFlip, RandomRot90, RandomVerticalFlip,
                                   build_train_transforms)

FILL = mean_fill(IMAGENET_MEAN)


def noise_image(height, width, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, height, width), dtype=np.uint8))


def write_dataset(root, images):
    """``images``: ``[(pixels ByteTensor[3, H, W], [(x1, y1, x2, y2, iscrowd), ...]), ...]`` -> a COCO root
    (lossless PNGs, so that pixels can be compared exactly)."""
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries, annotations = [], []
    for image_id, (pixels, boxes) in enumerate(images, start=1):
        name = f"{image_id}.png"
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(root / "train" / name)
        entries.append({"id": image_id, "file_name": name, "height": pixels.shape[1], "width": pixels.shape[2]})
        for x1, y1, x2, y2, crowd in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 5,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd})
    coco = {"images": entries, "annotations": annotations, "categories": [{"id": 5, "name": "thing"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    return str(root)


def test_window_keeps_inner_boxes_clips_cut_ones_and_ignores_mostly_hidden_ones():
    image = noise_image(300, 400)
    boxes = torch.tensor([[120., 60, 150, 100],    # inside
                          [210., 100, 240, 140],   # 18 of 30 px wide inside: 0.6, kept clipped
                          [218., 100, 238, 140],   # exactly half inside: kept
                          [220., 100, 260, 140],   # 8 of 40 px: 0.2 < 0.5, ignored
                          [300., 200, 320, 220]])  # outside: gone
    target = {"boxes": boxes, "labels": torch.tensor([0, 1, 2, 3, 4]),
              "crowd_boxes": torch.tensor([[90., 40, 110, 60]])}
    window, out = crop_window(image, target, left=100, top=50, region=128, size=128, min_visible=0.5)
    assert torch.equal(window, image[:, 50:178, 100:228])  # native resolution: the pixels themselves
    assert out["boxes"].tolist() == [[20, 10, 50, 50], [110, 50, 128, 90], [118, 50, 128, 90]]
    assert out["labels"].tolist() == [0, 1, 2]
    # The hidden box's visible part is ignored, and the crowd region is clipped too (never a negative).
    assert out["crowd_boxes"].tolist() == [[120, 50, 128, 90], [0, 0, 10, 10]]
    assert out["window"] == (100, 50, 228, 178) and out["orig_size"] == (128, 128)
    assert target["boxes"] is boxes and len(target["boxes"]) == 5  # the input target is untouched
    _, strict = crop_window(image, target, left=100, top=50, region=128, size=128, min_visible=0.7)
    assert strict["labels"].tolist() == [0] and len(strict["crowd_boxes"]) == 4


def test_window_at_scale_half_is_that_region_of_the_resized_image():
    image = noise_image(300, 400, seed=1)
    target = {"boxes": torch.tensor([[120., 60, 160, 100]]), "labels": torch.tensor([0]),
              "crowd_boxes": torch.zeros(0, 4)}
    window, out = crop_window(image, target, left=100, top=40, region=256, size=128, min_visible=0.5)
    resized = F.interpolate(image[None].float(), size=(150, 200), mode="bilinear", align_corners=False)[0]
    expected = resized[:, 20:148, 50:178]
    assert window.shape == (3, 128, 128)
    assert (window.float() - expected).abs().max() <= 0.5 + 1e-4  # uint8 rounding only
    assert out["boxes"].tolist() == [[10, 10, 30, 30]]


def test_a_small_image_is_padded_with_the_mean_colour_not_stretched(tmp_path):
    image = noise_image(50, 70, seed=2)
    root = write_dataset(tmp_path, [(image, [(10, 5, 30, 45, 0)])])
    dataset = coco_dataset.build_dataset(root, "train", train=True, hflip_prob=0,
                                         crop=CropSettings(size=64, fill=FILL))
    assert len(dataset) == 1 * 2 and dataset.aspect_ratios() == [1.0, 1.0]  # ceil(50 / 64) x ceil(70 / 64)
    for seed in range(5):
        torch.manual_seed(seed)
        window, target = dataset[0]
        left = target["window"][0]
        assert window.shape == (3, 64, 64) and 0 <= left <= 70 - 64 and target["window"][1::2] == (0, 50)
        assert torch.equal(window[:, :50], image[:, :, left:left + 64])
        assert (window[:, 50:] == torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1)).all()
        visible = min(30, left + 64) - max(10, left)
        if visible >= 10:  # at least half of the 20 px wide box
            assert target["boxes"].tolist() == [[max(10 - left, 0), 5, min(30, left + 64) - left, 45]]
    # The padding normalises to (about) the zeros the model pads a batch with.
    normalised = (torch.tensor(FILL) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert normalised.abs().max() < 0.01


def test_length_counts_windows_and_indices_map_to_images(tmp_path):
    root = write_dataset(tmp_path, [(noise_image(300, 400), []), (noise_image(50, 70), [])])
    base = coco_dataset.CocoDetection(tmp_path / "train", tmp_path / "annotations" / "instances_train.json")
    full = CropDataset(base, CropSettings(size=128))
    assert len(full) == 3 * 4 + 1
    assert full.locate(0) == (0, 0) and full.locate(11) == (0, 11) and full.locate(12) == (1, 0)
    with pytest.raises(IndexError):
        full.locate(13)
    assert len(CropDataset(base, CropSettings(size=128, scale=0.5))) == 2 * 2 + 1
    assert windows_per_image(2000, 2000, 256, 0.512) == 16  # 1024 px: exactly 4 x 4, not 5 x 5
    assert len(coco_dataset.build_dataset(root, "train")) == 2  # evaluation keeps whole images


def test_windows_favour_objects_stay_inside_and_follow_the_seed(tmp_path):
    image = noise_image(200, 300, seed=3)
    root = write_dataset(tmp_path, [(image, [(250, 150, 270, 170, 0)]), (noise_image(200, 300, seed=4), [])])
    dataset = coco_dataset.build_dataset(root, "train", train=True, hflip_prob=0,
                                         crop=CropSettings(size=64, object_prob=1.0))
    seeded = SeededDataset(dataset)
    lefts = set()
    for index in (0, 5, 19):  # image 1 (windows 0-19): every window holds its object's centre (260, 160)
        first, target = seeded[(index, 1234 + index)]
        again, same = seeded[(index, 1234 + index)]
        assert torch.equal(first, again) and same["window"] == target["window"]  # a function of the seed
        x1, y1, x2, y2 = target["window"]
        assert x1 <= 260 < x2 and y1 <= 160 < y2 and x2 <= 300 and y2 <= 200
        assert torch.equal(first, image[:, y1:y2, x1:x2])
    for seed in range(12):  # image 2 has no object: anywhere, inside the image
        x1, y1, x2, y2 = seeded[(30, seed)][1]["window"]
        assert 0 <= x1 and x2 <= 300 and 0 <= y1 and y2 <= 200 and x2 - x1 == 64
        lefts.add(x1)
    assert len(lefts) > 6


def test_scale_jitter_changes_the_region_not_the_window_size(tmp_path):
    root = write_dataset(tmp_path, [(noise_image(300, 400), [(100, 100, 140, 140, 0)])])
    dataset = coco_dataset.build_dataset(root, "train", train=True, hflip_prob=0,
                                         crop=CropSettings(size=64, scale_jitter=(0.5, 2.0)))
    regions = set()
    for seed in range(10):
        torch.manual_seed(seed)
        window, target = dataset[0]
        x1, y1, x2, y2 = target["window"]
        assert window.shape == (3, 64, 64) and x2 - x1 == y2 - y1 and 32 <= x2 - x1 <= 128
        regions.add(x2 - x1)
    assert len(regions) > 3


def rectangle_image(height, width, box):
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return image


def pixel_box(image):
    rows, cols = torch.nonzero(image[1] > 0, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


@pytest.mark.parametrize("transform", [RandomHorizontalFlip(1.0), RandomVerticalFlip(1.0), RandomRot90(1.0)])
def test_geometric_augmentations_move_boxes_exactly_with_the_pixels(transform):
    box = (5, 3, 17, 11)
    image = rectangle_image(20, 30, box)
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "crowd_boxes": torch.tensor([[0., 0, 4, 2]]),
              "labels": torch.tensor([0])}
    crowd_image = rectangle_image(20, 30, (0, 0, 4, 2))
    turns = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out_image, out = transform(image, target)
        assert out["boxes"][0].tolist() == pixel_box(out_image)
        torch.manual_seed(seed)  # the same draw moves the crowd region's pixels
        crowd_moved, _ = transform(crowd_image, {})
        assert out["crowd_boxes"][0].tolist() == pixel_box(crowd_moved)
        turns.add(tuple(out_image.shape))
    assert target["boxes"].tolist() == [list(box)]  # never edits the caller's target
    if isinstance(transform, RandomRot90):
        assert turns == {(3, 30, 20), (3, 20, 30)}  # k = 1, 3 swap the sides, k = 2 does not


def test_rot90_draws_each_quarter_turn():
    image = rectangle_image(20, 30, (5, 3, 17, 11))
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out, _ = RandomRot90(1.0)(image, {"boxes": torch.zeros(0, 4)})
        seen.add(next(k for k in (1, 2, 3) if torch.equal(out, torch.rot90(image, k, dims=(-2, -1)))))
    assert seen == {1, 2, 3}


def test_colour_jitter_on_a_grey_image_is_the_brightness_factor_alone():
    image = torch.full((3, 4, 5), 100, dtype=torch.uint8)
    torch.manual_seed(3)
    brightness = 1 + 0.2 * (2 * torch.rand(3)[0].item() - 1)  # the first of the three factors
    torch.manual_seed(3)
    out, target = ColourJitter(0.2)(image, {"boxes": torch.tensor([[1., 1, 2, 2]])})
    # Contrast about the mean and saturation about each pixel's grey level leave a flat grey image as it is.
    assert (out == round(100 * brightness)).all() and out.dtype == torch.uint8
    assert target["boxes"].tolist() == [[1, 1, 2, 2]]
    coloured = noise_image(8, 8)
    torch.manual_seed(0)
    assert torch.equal(ColourJitter(0.0)(coloured, {})[0], coloured)


def test_default_training_transforms_are_the_horizontal_flip_alone_drawing_once():
    transforms = build_train_transforms()
    assert isinstance(transforms, Compose) and repr(transforms) == repr(Compose([RandomHorizontalFlip(0.5)]))
    assert build_train_transforms(hflip_prob=0) is None
    assert [type(t) for t in build_train_transforms(0.5, vflip_prob=0.5, rot90_prob=0.5, colour_jitter=0.1)
            .transforms] == [RandomHorizontalFlip, RandomVerticalFlip, RandomRot90, ColourJitter]
    torch.manual_seed(0)
    transforms(noise_image(4, 4), {"boxes": torch.zeros(0, 4)})
    after = torch.rand(())
    torch.manual_seed(0)
    torch.rand(())
    assert torch.rand(()) == after  # one draw per sample, as before the new augmentations


@pytest.mark.parametrize("kwargs", [dict(size=16), dict(size=5000), dict(size=64, scale=0),
                                    dict(size=64, min_visible=0), dict(size=64, scale_jitter=(2.0, 1.0))])
def test_bad_crop_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        CropSettings(**kwargs)
