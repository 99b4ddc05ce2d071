"""Batch sampling that groups images of similar aspect ratio.

A batch is padded to its largest image, so mixing a wide and a tall image pads
both up to a square and wastes most of the compute on zeros; keeping wide
images with wide ones and tall with tall avoids that.
"""
import math
from typing import Sequence

from torch.utils.data import Sampler


def aspect_ratio_group_ids(aspect_ratios: Sequence[float]) -> list:
    """Group 0 for wide or square images (width / height >= 1), group 1 for tall ones."""
    group_ids = []
    for index, ratio in enumerate(aspect_ratios):
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"aspect ratio of image {index} is {ratio!r}; expected a positive finite width/height")
        group_ids.append(0 if ratio >= 1 else 1)
    return group_ids


class GroupedBatchSampler(Sampler):
    """Batches of ``batch_size`` indices from ``sampler`` that all share a group id.

    Indices are taken in the order ``sampler`` yields them; each goes into its
    group's buffer, and a buffer is yielded as a batch as soon as it is full, so
    the output is deterministic given the sampler's order (e.g. a
    ``DistributedSampler`` with a fixed seed and epoch).

    Leftovers: when the sampler is exhausted, the partly filled buffers are
    concatenated (group 0 first, each in sampler order) and yielded in batches
    of ``batch_size``, which may mix groups. No index is lost in an epoch; with
    ``drop_last`` only the final, smaller batch is dropped, as in a plain
    ``BatchSampler``. Either way the number of batches is
    ``ceil(len(sampler) / batch_size)`` (``floor`` with drop_last) whatever the
    group mix, so every DDP rank runs the same number of steps.

    Args:
        sampler: yields dataset indices (``RandomSampler``, ``DistributedSampler``, ...).
        group_ids: group of every dataset index, ``group_ids[i]`` for index ``i``.
        batch_size: images per batch.
        drop_last: drop the final batch if it is smaller than ``batch_size``.
    """

    def __init__(self, sampler, group_ids: Sequence[int], batch_size: int, drop_last: bool = False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int):
        """Forward to the underlying sampler (``DistributedSampler`` reshuffles per epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        buffers = {}
        for index in self.sampler:
            if not 0 <= index < len(self.group_ids):
                raise IndexError(f"sampler yielded index {index}, but group_ids covers {len(self.group_ids)} images")
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                yield buffer
                buffers[self.group_ids[index]] = []
        leftovers = [index for group in sorted(buffers) for index in buffers[group]]
        for start in range(0, len(leftovers), self.batch_size):
            batch = leftovers[start:start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def __len__(self) -> int:
        # Full group batches + ceil(leftovers / batch_size) always sums to this (see class docstring).
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)
