"""GroupedBatchSampler: single-group batches, every index once, same step count on every rank."""
import itertools

import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from utils.data.samplers import GroupedBatchSampler, aspect_ratio_group_ids


def random_group_ids(num_images, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (num_images,), generator=generator).tolist()


def check_epoch(batches, group_ids, expected_indices, batch_size, drop_last=False):
    flat = [index for batch in batches for index in batch]
    if drop_last:
        assert len(flat) > len(expected_indices) - batch_size and all(len(b) == batch_size for b in batches)
        assert len(set(flat)) == len(flat) and set(flat) <= set(expected_indices)
    else:
        assert sorted(flat) == sorted(expected_indices)  # every index exactly once
    assert all(0 < len(batch) <= batch_size for batch in batches)
    full_group_batches = [b for b in batches if len({group_ids[i] for i in b}) == 1]
    # At most two mixed batches: those made of the two groups' leftovers.
    assert len(batches) - len(full_group_batches) <= 2
    return flat


def test_aspect_ratio_group_ids():
    assert aspect_ratio_group_ids([1.5, 1.0, 0.75, 0.999]) == [0, 0, 1, 1]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="aspect ratio of image 1"):
            aspect_ratio_group_ids([1.0, bad])


@pytest.mark.parametrize("num_images, batch_size", [(1, 4), (7, 2), (37, 4), (64, 8), (10, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_single_group_batches_cover_every_index(num_images, batch_size, drop_last):
    group_ids = random_group_ids(num_images)
    sampler = RandomSampler(range(num_images), generator=torch.Generator().manual_seed(1))
    batch_sampler = GroupedBatchSampler(sampler, group_ids, batch_size, drop_last)
    batches = list(batch_sampler)
    check_epoch(batches, group_ids, list(range(num_images)), batch_size, drop_last)
    assert len(batches) == len(batch_sampler)
    # The leftovers come last: every batch before them is single-group and full.
    leftover_start = len(batches) - sum(1 for b in batches if len(b) < batch_size or len({group_ids[i] for i in b}) > 1)
    for batch in batches[:leftover_start]:
        assert len({group_ids[i] for i in batch}) == 1 and len(batch) == batch_size


def test_only_one_group_matches_plain_batch_sampler():
    sampler = SequentialSampler(range(10))
    grouped = list(GroupedBatchSampler(sampler, [0] * 10, 3))
    assert grouped == list(BatchSampler(sampler, 3, drop_last=False))


def test_groups_in_sampler_order_hand_computed():
    group_ids = [0, 1, 0, 1, 1, 0, 0, 1]
    batches = list(GroupedBatchSampler(SequentialSampler(range(8)), group_ids, batch_size=3))
    assert batches == [[1, 3, 4], [0, 2, 5], [6, 7]]


def test_deterministic_given_sampler_order():
    group_ids = random_group_ids(50)

    def epoch():
        sampler = RandomSampler(range(50), generator=torch.Generator().manual_seed(3))
        return list(GroupedBatchSampler(sampler, group_ids, 4))

    assert epoch() == epoch()


@pytest.mark.parametrize("num_images, num_replicas, batch_size", [(101, 4, 3), (64, 2, 8), (5, 3, 2)])
def test_distributed_sampler_same_steps_on_every_rank(num_images, num_replicas, batch_size):
    group_ids = random_group_ids(num_images, seed=num_images)
    for epoch in range(3):
        lengths, seen = set(), []
        for rank in range(num_replicas):
            sampler = DistributedSampler(range(num_images), num_replicas=num_replicas, rank=rank,
                                         shuffle=True, seed=7)
            batch_sampler = GroupedBatchSampler(sampler, group_ids, batch_size)
            batch_sampler.set_epoch(epoch)
            batches = list(batch_sampler)
            check_epoch(batches, group_ids, list(sampler), batch_size)
            assert len(batches) == len(batch_sampler)
            lengths.add(len(batches))
            seen.extend(itertools.chain.from_iterable(batches))
        assert len(lengths) == 1  # DDP ranks must step the same number of times
        assert set(seen) == set(range(num_images))  # ranks together cover the dataset


def test_set_epoch_reshuffles_and_is_reproducible():
    group_ids = random_group_ids(40)

    def batches(epoch):
        sampler = DistributedSampler(range(40), num_replicas=2, rank=1, shuffle=True, seed=0)
        batch_sampler = GroupedBatchSampler(sampler, group_ids, 4)
        batch_sampler.set_epoch(epoch)
        return list(batch_sampler)

    assert batches(0) == batches(0)
    assert batches(0) != batches(1)
    GroupedBatchSampler(SequentialSampler(range(3)), [0] * 3, 2).set_epoch(5)  # no set_epoch: no error


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(SequentialSampler(range(3)), [0] * 3, 0)
    with pytest.raises(IndexError, match="group_ids covers 2 images"):
        list(GroupedBatchSampler(SequentialSampler(range(3)), [0, 1], 2))


def test_with_dataloader():
    dataset = list(range(24))  # 12 per group: no leftovers
    group_ids = [i % 2 for i in dataset]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=GroupedBatchSampler(SequentialSampler(dataset), group_ids, 4),
        collate_fn=lambda batch: batch)
    batches = list(loader)
    assert len(loader) == len(batches) == 6
    assert all(len({i % 2 for i in batch}) == 1 for batch in batches)
