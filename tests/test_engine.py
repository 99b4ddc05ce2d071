"""The training step's handling of non-finite losses, with a stub model (no data, no real network)."""
import argparse

import pytest
import torch

from engine import NonFiniteLossError, train_one_epoch
from utils.checkpoint import save_checkpoint


class StubModel(torch.nn.Module):
    """Loss = (w - 3)^2, or NaN on the scheduled calls."""

    def __init__(self, nan_calls):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.nan_calls, self.calls = set(nan_calls), 0

    def forward(self, images, targets):
        self.calls += 1
        loss = (self.weight - 3) ** 2
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return {"classification": loss, "bbox_regression": loss * 0}


class StubBatchSampler:
    def __init__(self, n):
        self.start_batch, self.batch_sampler = 0, range(n)

    def __len__(self):
        return len(self.batch_sampler)


class StubLoader(list):
    """Batches of (images, targets, bad) with the batch-sampler surface train_one_epoch reads."""

    def __init__(self, n):
        super().__init__([([torch.zeros(3, 4, 4)], [{}], []) for _ in range(n)])
        self.batch_sampler = StubBatchSampler(n)


def run_epoch(model, tmp_path, batches=8, max_non_finite=3):
    loader = StubLoader(batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(amp="none", epochs=1, clip_grad_norm=0, print_freq=100, world_size=1,
                              bad_image_count=0, checkpoint_every=0, max_iters=0, output_dir=str(tmp_path),
                              max_non_finite=max_non_finite, max_bad_images=0, num_train_images=batches)
    writer = argparse.Namespace(write=lambda record, step=None: None)
    iteration, finished = train_one_epoch(model, optimizer, scheduler, scaler, loader, torch.device("cpu"), 0, 0,
                                          args, writer, lambda *a: None)
    return iteration, finished, args


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = StubModel(nan_calls={2, 5})
    iteration, finished, args = run_epoch(model, tmp_path)
    assert finished and iteration == 6 and args.non_finite_count == 2
    assert torch.isfinite(model.weight) and 0 < model.weight.item() < 3.5


def test_consecutive_non_finite_losses_stop_with_iteration_and_checkpoint(tmp_path):
    save_checkpoint({"model": {}}, str(tmp_path / "checkpoint_e0000_i00000001.pth"))
    model = StubModel(nan_calls={3, 4, 5})
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row, the last at iteration 2.*"
                                                 r"checkpoint_e0000_i00000001\.pth"):
        run_epoch(model, tmp_path)
