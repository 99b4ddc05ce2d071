"""The training step's handling of non-finite losses and bad images, with a stub model (no data, no real network)."""
import pytest
import torch

from engine import NonFiniteLossError, TooManyBadImagesError, TrainState, train_one_epoch
from recipes import TrainConfig
from utils.runtime.checkpoint import save_checkpoint


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
    """Batches of (images, targets, bad) with the batch-sampler surface train_one_epoch reads;
    ``bad`` maps a batch index to the messages of its unreadable images (all of them, if empty)."""

    def __init__(self, n, bad=None, empty=()):
        bad = bad or {}
        super().__init__([([] if i in empty else [torch.zeros(3, 4, 4)], [] if i in empty else [{}], bad.get(i, []))
                          for i in range(n)])
        self.batch_sampler = StubBatchSampler(n)


class Writer:
    def __init__(self):
        self.records = []

    def write(self, record, step=None):
        self.records.append(record)


def run_epoch(model, tmp_path, batches=8, max_non_finite=3, state=None, bad=None, empty=(), bad_image_limit=10):
    loader = StubLoader(batches, bad, empty)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    config = TrainConfig(epochs=1, print_freq=1, output_dir=str(tmp_path), max_non_finite=max_non_finite)
    writer = Writer()
    state, finished = train_one_epoch(model, optimizer, scheduler, scaler, loader, torch.device("cpu"),
                                      state or TrainState(), config, writer, lambda state: None,
                                      bad_image_limit=bad_image_limit)
    return state, finished, writer.records


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = StubModel(nan_calls={2, 5})
    state, finished, records = run_epoch(model, tmp_path)
    assert finished and state.iteration == 6 and state.non_finite_steps == 2
    assert state.epoch == 1 and state.batch_in_epoch == 0  # the next batch: epoch 2's first
    assert torch.isfinite(model.weight) and 0 < model.weight.item() < 3.5
    assert records[-1]["non_finite_steps"] == 2


def test_empty_batches_are_skipped_and_bad_images_counted_on_top_of_a_resumed_state(tmp_path):
    model = StubModel(nan_calls=set())
    resumed = TrainState(iteration=40, bad_images=3, non_finite_steps=1)
    state, finished, records = run_epoch(model, tmp_path, batches=6, state=resumed, bad={1: ["a.jpg"], 4: ["b", "c"]},
                                         empty={4})
    assert finished and state.iteration == 45 and model.calls == 5  # batch 4 held no readable image
    assert state.bad_images == 6 and state.non_finite_steps == 1
    assert [r["bad_images"] for r in records] == [3, 4, 4, 4, 6]


def test_bad_image_budget_stops_the_run_naming_the_images(tmp_path):
    with pytest.raises(TooManyBadImagesError, match=r"3 unreadable .* more than --max-bad-images 2.*x\.jpg.*y\.jpg"):
        run_epoch(StubModel(nan_calls=set()), tmp_path, bad={0: ["x.jpg"], 2: ["y.jpg", "z.jpg"]}, bad_image_limit=2)


def test_consecutive_non_finite_losses_stop_with_iteration_and_checkpoint(tmp_path):
    save_checkpoint({"model": {}}, str(tmp_path / "checkpoint_e0000_i00000001.pth"))
    model = StubModel(nan_calls={3, 4, 5})
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row, the last at iteration 2.*"
                                                 r"checkpoint_e0000_i00000001\.pth"):
        run_epoch(model, tmp_path)
