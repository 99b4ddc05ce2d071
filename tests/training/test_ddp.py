"""DDP on CPU (torchrun, 2 processes): decisions inside the lock-step loop are taken by all ranks together."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import coco_dataset
from gloo_ranks import run_on_ranks
from losses.retinanet_loss import RetinaNetLoss
from test_train import REPO, train_command
from utils.data.demo_data import generate_demo_dataset
from utils.data.loaders import build_train_loader


def torchrun(data, out, *extra, timeout=300):
    """``torchrun --standalone`` (a free port each time) with 2 CPU processes; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += train_command(data, out, "--device", "cpu", *extra)[1:]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def first_batches(dataset, rank: int, count: int, batch_per_rank: int = 2, seed: int = 42, world_size: int = 2):
    """File names of rank ``rank``'s first ``count`` batches of epoch 0, as train.py's loader draws them."""
    loader = build_train_loader(dataset, batch_per_rank, 0, seed, rank, world_size)
    loader.batch_sampler.set_epoch(0)
    batches = []
    for batch in loader.batch_sampler:
        batches.append([dataset.coco.imgs[dataset.ids[index]]["file_name"] for index, _ in batch])
        if len(batches) == count:
            return batches
    raise AssertionError("not enough batches")


@pytest.fixture()
def one_rank_batch_unreadable(tmp_path):
    """24 training images: every image of rank 1's first batch and one of rank 0's second batch are corrupt."""
    root = tmp_path / "data"
    generate_demo_dataset(str(root), num_train=24, num_val=4, image_size=64, seed=5, show_progress=False)
    dataset = coco_dataset.build_dataset(str(root), "train", train=True)
    rank1_first = first_batches(dataset, rank=1, count=1)[0]
    rank0_second = first_batches(dataset, rank=0, count=2)[1][:1]
    for name in rank1_first + rank0_second:
        (root / "train" / name).write_bytes(b"not an image")
    return str(root), rank1_first, rank0_second


@pytest.mark.slow
def test_a_rank_whose_whole_batch_is_unreadable_skips_the_step_with_the_others(one_rank_batch_unreadable, tmp_path):
    data, rank1_bad, rank0_bad = one_rank_batch_unreadable
    out = tmp_path / "run"
    result = torchrun(data, out, "--epochs", "1", "--max-bad-images", "10")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "1 rank(s) have no readable image in their batch; step skipped on every rank" in output
    for name in rank1_bad + rank0_bad:  # rank 0 names every rank's skipped images
        assert name in result.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert train_records[-1]["bad_images"] == 3  # summed over the ranks: 2 on rank 1, 1 on rank 0
    assert train_records[-1]["iteration"] == 5  # 6 batches per rank, one skipped by both
    assert "all 2 ranks agree on the final weights" in output


@pytest.mark.slow
def test_the_bad_image_budget_stops_every_rank_with_one_message(one_rank_batch_unreadable, tmp_path):
    data, rank1_bad, _ = one_rank_batch_unreadable
    result = torchrun(data, tmp_path / "run", "--epochs", "1", "--max-bad-images", "1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]  # printed once, by rank 0
    # The first step already skips 2 (all of rank 1's batch): every rank stops there.
    assert "2 unreadable training images skipped, more than --max-bad-images 1" in errors[0]
    assert all(name in errors[0] for name in rank1_bad)


# The loss normaliser (foreground anchors of the whole batch, over all ranks) against one process.
# 16 px anchors every 8 px and 32 px anchors every 16 px on a 96 px image.
ANCHORS = torch.cat([torch.tensor([[x, y, x + size, y + size] for y in range(0, 96 - size + 1, stride)
                                   for x in range(0, 96 - size + 1, stride)], dtype=torch.float32)
                     for size, stride in ((16, 8), (32, 16))])


class SharedHead(torch.nn.Module):
    """Class logits ``[B, A, K]`` and box deltas ``[B, A, 4]`` from a per-anchor feature ``[B, A, 1]``,
    with weights every image shares, so DDP has gradients to average."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.cls = torch.nn.Linear(1, num_classes)
        self.box = torch.nn.Linear(1, 4)

    def forward(self, features):
        return self.cls(features), 0.1 * self.box(features)


def four_images():
    """Per-anchor features and targets: images 0-1 (rank 0's half) hold one object each, 2-3 three each."""
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(4, len(ANCHORS), 1, generator=generator)
    boxes = [[[8.0, 8, 24, 24]], [[40.0, 16, 72, 48]],
             [[8.0, 8, 24, 24], [48.0, 48, 64, 64], [16.0, 56, 48, 88]],
             [[0.0, 0, 32, 32], [64.0, 8, 80, 24], [40.0, 40, 72, 72]]]
    targets = [{"boxes": torch.tensor(b), "labels": torch.arange(len(b)) % 3} for b in boxes]
    return features, targets


def loss_and_gradients(features, targets, wrap=lambda head: head) -> dict:
    torch.manual_seed(0)
    head = SharedHead(num_classes=3)
    model = wrap(head)  # held until backward: DDP's gradient averaging lives in this object
    cls_logits, box_deltas = model(features)
    losses = RetinaNetLoss(num_classes=3)(cls_logits, box_deltas, ANCHORS, targets)
    sum(losses.values()).backward()
    return {"losses": {name: value.detach() for name, value in losses.items()},
            "gradients": {name: parameter.grad for name, parameter in head.named_parameters()}}


def _ddp_half_batch(rank: int, world_size: int, features, targets) -> dict:
    """Rank ``rank``'s half of the batch through DistributedDataParallel (run on each spawned rank)."""
    half = slice(2 * rank, 2 * rank + 2)
    return loss_and_gradients(features[half], targets[half], wrap=DistributedDataParallel)


@pytest.mark.slow
def test_ddp_loss_normaliser_equals_one_process_on_the_whole_batch(tmp_path):
    features, targets = four_images()
    single = loss_and_gradients(features, targets)
    ranks = run_on_ranks(_ddp_half_batch, 2, tmp_path, features, targets)
    # DDP averages the ranks' gradients: each rank's loss must be its share of the whole batch's sum
    # divided by the whole batch's foreground count, so the mean of the rank losses is the batch loss.
    for name, value in single["losses"].items():
        torch.testing.assert_close((ranks[0]["losses"][name] + ranks[1]["losses"][name]) / 2, value, msg=name)
    for rank in ranks:
        for name, gradient in single["gradients"].items():
            torch.testing.assert_close(rank["gradients"][name], gradient, msg=name)
    # The halves have different foreground counts, so normalising per rank would give another answer.
    matcher = RetinaNetLoss(num_classes=3)
    foreground = [int((matcher.match(ANCHORS, targets[h:h + 2])[0] >= 0).sum()) for h in (0, 2)]
    assert foreground[0] < foreground[1], foreground
    per_rank = [loss_and_gradients(features[h:h + 2], targets[h:h + 2])["losses"]["bbox_regression"] for h in (0, 2)]
    assert not torch.allclose((per_rank[0] + per_rank[1]) / 2, single["losses"]["bbox_regression"])
