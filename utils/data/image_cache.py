"""Decoded images kept in memory between the crop windows cut from them.

Crop training serves many windows of one large image per epoch (``CropDataset``), and each
window used to decode the whole image again: a 6-megapixel JPEG costs tens of milliseconds to
decode for a 256 x 256 window, more than a GPU step on it. :class:`DecodedImageCache` keeps the
most recently used decoded images up to a byte budget, one cache per data-loading process (a
DataLoader worker holds its own copy of the dataset, so the budget counts per worker and per
rank). Decoding is deterministic, so a cached image is the same pixels a fresh decode gives and
a run with the cache trains exactly like one without (tests/data/test_image_cache.py).
"""
from collections import OrderedDict
from typing import Callable

import torch


class DecodedImageCache:
    """Least-recently-used ``key -> (ByteTensor[3, H, W], target)`` bounded by ``max_bytes`` of pixels.

    An image larger than the whole budget is never kept (``max_bytes = 0`` disables the cache).
    Callers must not write into a returned image or target: every later window of that image
    reads the same tensors.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key, load: Callable[[], tuple]) -> tuple:
        """The cached ``(image, target)`` for ``key``, or ``load()``'s, kept while it fits."""
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return item
        self.misses += 1
        item = load()
        size = _pixel_bytes(item[0])
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, (evicted, _) = self._items.popitem(last=False)
                self.bytes -= _pixel_bytes(evicted)
            self._items[key] = item
            self.bytes += size
        return item

    def __len__(self) -> int:
        return len(self._items)


def _pixel_bytes(image: torch.Tensor) -> int:
    return image.numel() * image.element_size()
