"""The AMP self-check (utils/training/amp_check.py): a model whose half-precision loss differs is reported,
a normal one is not, the check leaves no trace, DDP ranks agree, and train.py runs it."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from model import build_retinanet
from utils.data.demo_data import generate_demo_dataset
from utils.training.amp_check import check_amp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StubDetector(torch.nn.Module):
    """Losses from the images' means; under autocast multiplied by ``amp_factor`` (a broken AMP path).
    Each call bumps a buffer, as BatchNorm's running statistics would be."""

    def __init__(self, amp_factor: float = 1.0):
        super().__init__()
        self.amp_factor = amp_factor
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, images, targets):
        self.calls += 1
        value = torch.stack([image.float().mean() for image in images]).sum() + 1.0
        losses = {"classification": value, "bbox_regression": value * 0.25}
        if torch.is_autocast_enabled("cpu"):
            losses = {k: v * self.amp_factor for k, v in losses.items()}
        return losses


def one_batch(num_images=2):
    return [([torch.rand(3, 16, 16) for _ in range(num_images)], [{}] * num_images, [])]


@pytest.mark.parametrize("dtype,name", [(torch.float16, "fp16"), (torch.bfloat16, "bf16")])
def test_a_loss_that_differs_under_autocast_is_reported_with_the_difference(dtype, name, caplog):
    with caplog.at_level(logging.WARNING, logger="utils.training.amp_check"):
        result = check_amp(StubDetector(amp_factor=1.3), one_batch(), "cpu", dtype)
    assert not result.passed
    assert result.relative_difference["classification"] == pytest.approx(0.3 / 1.25, rel=1e-3)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"{name} and fp32 disagree" in record.message and "classification" in record.message
    assert "24.0 %" in record.message and "--amp-check off" in record.message


def test_an_agreeing_model_passes_without_a_warning(caplog):
    model = StubDetector(amp_factor=1.0 + 1e-3)  # 0.1 %, inside the 5 % tolerance
    with caplog.at_level(logging.INFO, logger="utils.training.amp_check"):
        result = check_amp(model, one_batch(), "cpu", torch.bfloat16)
    assert result.passed and result.warning is None
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "AMP check passed" in caplog.records[0].message
    assert model.calls.item() == 0 and model.training  # buffers restored, mode kept


def test_a_non_finite_half_precision_loss_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.training.amp_check"):
        result = check_amp(StubDetector(amp_factor=float("inf")), one_batch(), "cpu", torch.float16)
    assert not result.passed and "not finite" in result.warning and "fp16" in result.warning


def test_an_empty_first_batch_skips_the_check():
    result = check_amp(StubDetector(amp_factor=2.0), [([], [], ["bad.jpg"])], "cpu", torch.bfloat16)
    assert result.skipped and result.passed


def test_a_real_detector_passes_in_bf16_and_keeps_its_state():
    torch.manual_seed(0)
    model = build_retinanet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64,
                            max_size=64, backbone_norm="bn", trainable_backbone_layers=5).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6, 40, 50]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 2, 30, 30]]), "labels": torch.tensor([2])}]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = check_amp(model.eval(), [(images, targets, [])], "cpu", torch.bfloat16)
    assert result.passed, result.warning
    assert 0 < max(result.relative_difference.values()) < 0.05  # it did compare two different computations
    assert not model.training  # the mode it was given
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)


def _ddp_rank(rank: int, init_file: str, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Only rank 1's AMP is broken: both ranks must reach the same verdict from the mean losses.
        result = check_amp(StubDetector(amp_factor=1.0 if rank == 0 else 1.5), one_batch(rank + 1), "cpu",
                           torch.bfloat16)
        results[rank] = (result.passed, round(sum(result.fp32.values()), 6), round(sum(result.amp.values()), 6))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # several processes, seconds each: out of the edit-test loop
def test_ddp_ranks_reach_the_same_verdict(tmp_path):
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_ddp_rank, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert results[0] == results[1]
    assert results[0][0] is False  # rank 1's difference shows in the mean


@pytest.mark.slow
def test_train_py_runs_the_check_with_amp_and_skips_it_when_asked(tmp_path):
    data = tmp_path / "data"
    generate_demo_dataset(str(data), num_train=4, num_val=2, image_size=64, seed=1, show_progress=False)
    command = [sys.executable, os.path.join(REPO, "train.py"), "--recipe", "demo", "--data-path", str(data),
               "--device", "cpu", "--amp", "bf16", "--workers", "0", "--batch-size", "2", "--max-iters", "1",
               "--num-threads", "1", "--backbone", "resnet18", "--fpn-channels", "32", "--head-convs", "1",
               "--num-extra-levels", "1", "--anchor-base-sizes", "16", "32", "64", "128", "--min-size", "64",
               "--max-size", "64"]
    for flag, expected in (("on", True), ("off", False)):
        result = subprocess.run(command + ["--amp-check", flag, "--output-dir", str(tmp_path / flag)], cwd=REPO,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert ("AMP check passed: bf16 loss" in result.stdout) == expected, result.stdout[-2000:]
