"""The decoded-image cache of crop training (utils/data/image_cache.py): its byte budget and
order of eviction, and crop windows served from it equal to windows of a fresh decode."""
import numpy as np
import torch
from PIL import Image

import coco_dataset
from tests.data.test_crops import write_dataset
from utils.data.crops import CropDataset, CropSettings
from utils.data.image_cache import DecodedImageCache
from utils.data.loaders import SeededDataset


def image_of(nbytes: int) -> tuple:
    return torch.zeros(3, 1, nbytes // 3, dtype=torch.uint8), {}


def test_least_recently_used_images_leave_first_and_the_budget_holds():
    cache, loads = DecodedImageCache(max_bytes=300), []

    def loader(key):
        return lambda: loads.append(key) or image_of(120)

    for key in ("a", "b", "a", "c"):  # c evicts b, the least recently used, not a
        cache.get(key, loader(key))
    assert loads == ["a", "b", "c"] and cache.bytes == 240 and len(cache) == 2
    cache.get("a", loader("a"))
    cache.get("b", loader("b"))
    assert loads == ["a", "b", "c", "b"] and (cache.hits, cache.misses) == (2, 4)
    big = cache.get("big", lambda: image_of(600))  # larger than the whole budget: returned, not kept
    assert big[0].numel() == 600 and "big" not in cache._items and cache.bytes == 240
    off = DecodedImageCache(max_bytes=0)
    off.get("a", lambda: image_of(3))
    assert len(off) == 0 and off.bytes == 0


class ZeroTheWindow:
    """A transform that writes into its input, as in-place augmentations may."""

    def __call__(self, image, target):
        image.zero_()
        return image, target


def test_windows_from_the_cache_equal_windows_of_a_fresh_decode_even_when_transforms_write_in_place(tmp_path):
    rng = np.random.default_rng(0)
    big = torch.from_numpy(rng.integers(0, 256, (3, 300, 400), dtype=np.uint8))
    small = torch.from_numpy(rng.integers(0, 256, (3, 50, 60), dtype=np.uint8))  # the whole image is one window
    root = write_dataset(tmp_path, [(big, [(20, 30, 60, 90, 0), (300, 200, 340, 230, 0)]), (small, [])])
    settings = CropSettings(size=64, scale_jitter=(0.8, 1.25))
    build = {"train": True, "vflip_prob": 0.5, "rot90_prob": 0.5, "colour_jitter": 0.3, "crop": settings}
    fresh = SeededDataset(coco_dataset.build_dataset(root, "train", **build))
    cached_set = coco_dataset.build_dataset(root, "train", crop_cache_bytes=2**20, **build)
    cached = SeededDataset(cached_set)
    indices = list(range(len(cached_set))) * 2
    for index in indices:
        a, b = fresh[(index, 7 * index)], cached[(index, 7 * index)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
        assert a[1]["window"] == b[1]["window"]
    assert cached_set.cache.misses == 2 and cached_set.cache.hits == len(indices) - 2

    base = coco_dataset.CocoDetection(tmp_path / "train", tmp_path / "annotations" / "instances_train.json")
    writing = CropDataset(base, CropSettings(size=64), transforms=ZeroTheWindow(), cache_bytes=2**20)
    for index in range(len(writing)):
        assert not writing[index][0].any()
    for key, (image, _) in writing.cache._items.items():  # the cached decodes are untouched
        assert torch.equal(image, (big, small)[key])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "train" / "2.png")), small.permute(1, 2, 0).numpy())
