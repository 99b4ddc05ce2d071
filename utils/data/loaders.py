"""Data loaders for training and evaluation.

Training batches come from a DistributedSampler (also with one process: it gives
a seeded, per-epoch shuffle) grouped by aspect ratio. Every sample carries its
own augmentation seed derived from (seed, epoch, index), so a resumed run -- even
mid-epoch, with any number of workers -- sees exactly the same augmented images.

Images differ in size (the model batches them), so a batch is a list of images and a list
of targets. There are two collate functions, one per need: :func:`collate_train` also returns
the messages of the unreadable images it skipped, which the training loop counts against its
budget; :func:`collate_eval` logs and drops them, for evaluation and any plain ``DataLoader``
over ``coco_dataset.CocoDetection``.
"""
import logging
import random

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from utils.data.image_io import ImageReadError
from utils.data.samplers import GroupedBatchSampler, aspect_ratio_group_ids

logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed odd-multiplier mix: different (epoch, index) pairs get unrelated seeds.
    return (seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2 ** 63)


class SeededBatches:
    """Wraps a batch sampler: yields ``[(index, seed)]`` batches and can start mid-epoch."""

    def __init__(self, batch_sampler, seed: int):
        self.batch_sampler, self.seed = batch_sampler, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.start_batch:
                yield [(index, sample_seed(self.seed, self.epoch, index)) for index in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.start_batch


class SeededDataset(Dataset):
    """Seeds the RNGs before each sample's transforms; unreadable images become None (skipped, counted)."""

    def __init__(self, dataset, skip_bad_images: bool = True):
        self.dataset, self.skip_bad_images = dataset, skip_bad_images

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        if seed is not None:
            torch.manual_seed(seed)
            random.seed(seed)
        try:
            return self.dataset[index]
        except ImageReadError as exc:
            if not self.skip_bad_images:
                raise
            return ("bad_image", str(exc))


def collate_train(batch):
    """``[(image, target), ...]`` -> ``(images, targets, bad)``: images and targets as lists, ``bad``
    the messages of the samples :class:`SeededDataset` could not read (left out of both lists)."""
    images, targets, bad = [], [], []
    for sample in batch:
        if isinstance(sample, tuple) and len(sample) == 2 and isinstance(sample[0], str):
            bad.append(sample[1])
        else:
            images.append(sample[0])
            targets.append(sample[1])
    return images, targets, bad


def collate_eval(batch):
    """``[(image, target), ...]`` -> ``(images, targets)`` as lists; unreadable images are logged and left out."""
    images, targets, bad = collate_train(batch)
    for message in bad:
        logger.warning("skipped unreadable image during evaluation: %s", message)
    return images, targets


def build_train_loader(dataset, batch_size_per_process: int, workers: int, seed: int, rank: int = 0,
                       world_size: int = 1, aspect_ratio_grouping: bool = True, pin_memory: bool = False):
    """A DataLoader whose ``batch_sampler.set_epoch(epoch, start_batch)`` must be called each epoch."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if aspect_ratio_grouping:
        group_ids = aspect_ratio_group_ids(dataset.aspect_ratios())
        batch_sampler = GroupedBatchSampler(sampler, group_ids, batch_size_per_process)
    else:
        batch_sampler = _EpochBatchSampler(sampler, batch_size_per_process)
    return DataLoader(SeededDataset(dataset), batch_sampler=SeededBatches(batch_sampler, seed),
                      num_workers=workers, collate_fn=collate_train, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


def build_eval_loader(dataset, batch_size: int, workers: int, rank: int = 0, world_size: int = 1,
                      pin_memory: bool = False):
    """Ordered loader over this rank's shard (DistributedSampler pads shards with repeats: dedupe by image_id)."""
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_eval, pin_memory=pin_memory)


class _EpochBatchSampler(BatchSampler):
    """BatchSampler that forwards ``set_epoch`` to its DistributedSampler."""

    def __init__(self, sampler, batch_size: int):
        super().__init__(sampler, batch_size, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
