"""Seeded batches: per-sample augmentation seeds, mid-epoch starts, and the loaders built on them."""
import torch

import coco_dataset
from utils.data.demo_data import generate_demo_dataset
from utils.data.image_io import ImageReadError
from utils.data.loaders import SeededBatches, SeededDataset, build_train_loader, collate_train, sample_seed


class ListBatches:
    def __init__(self, batches):
        self.batches, self.epochs = batches, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_seeds_depend_on_seed_epoch_and_index_only():
    seeds = {sample_seed(s, e, i) for s in (0, 1) for e in (0, 1, 2) for i in range(50)}
    assert len(seeds) == 2 * 3 * 50  # no collisions among nearby triples
    assert sample_seed(3, 1, 7) == sample_seed(3, 1, 7)


def test_mid_epoch_start_yields_the_remaining_batches_with_the_same_seeds():
    inner = ListBatches([[0, 1], [2, 3], [4, 5]])
    batches = SeededBatches(inner, seed=5)
    batches.set_epoch(2)
    full = list(batches)
    batches.set_epoch(2, start_batch=1)
    assert len(batches) == 2 and list(batches) == full[1:]
    assert full[0] == [(0, sample_seed(5, 2, 0)), (1, sample_seed(5, 2, 1))]
    assert inner.epochs == [2, 2]


class RandomItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index == 3:
            raise ImageReadError("cannot read image 'x.jpg': truncated", "x.jpg")
        return torch.rand(()), {"index": index}


def test_seeded_dataset_reproduces_augmentation_and_turns_bad_images_into_values():
    dataset = SeededDataset(RandomItems())
    first, second = dataset[(1, 99)], dataset[(1, 99)]
    assert torch.equal(first[0], second[0]) and not torch.equal(first[0], dataset[(1, 100)][0])
    images, targets, bad = collate_train([dataset[(0, 1)], dataset[(3, 2)]])
    assert len(images) == 1 and targets == [{"index": 0}] and bad == ["cannot read image 'x.jpg': truncated"]


def test_train_loader_is_reproducible_with_workers(tmp_path):
    root = str(tmp_path / "d")
    generate_demo_dataset(root, num_train=10, num_val=2, image_size=48, seed=0, show_progress=False)
    dataset = coco_dataset.build_dataset(root, "train", train=True)

    def epoch_batches(workers, start=0):
        loader = build_train_loader(dataset, 4, workers, seed=3)
        loader.batch_sampler.set_epoch(1, start)
        return [(torch.stack([img.float().mean() for img in images]), [t["image_id"] for t in targets])
                for images, targets, _ in loader]

    plain = epoch_batches(0)
    with_workers = epoch_batches(2)
    resumed = epoch_batches(0, start=1)
    assert len(plain) == 3
    for (a, ids_a), (b, ids_b) in zip(plain, with_workers):
        assert ids_a == ids_b and torch.equal(a, b)  # same images, same flips, whatever the worker count
    assert [ids for _, ids in resumed] == [ids for _, ids in plain[1:]]
