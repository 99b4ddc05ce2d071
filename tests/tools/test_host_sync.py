"""The training step reads device values back only where engine.py says it does.

On CPU nothing waits, so the reads are counted by patching ``torch.Tensor``'s read methods
(``benchmarks/host_sync.py``) during real ``engine.train_one_epoch`` steps of a tiny RetinaNet;
with CUDA, ``torch.cuda.set_sync_debug_mode`` also counts the synchronisations themselves.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_sync  # noqa: E402
from model import build_retinanet  # noqa: E402
from recipes import TrainConfig  # noqa: E402
from utils.data.demo_data import generate_demo_dataset  # noqa: E402
from utils.data.loaders import build_train_loader  # noqa: E402

import coco_dataset  # noqa: E402

SMALL = dict(num_classes=4, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64, max_size=64)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Five real training batches (decoding, flips, collation) of two images, on the host."""
    root = tmp_path_factory.mktemp("sync_data")
    generate_demo_dataset(str(root), num_train=10, num_val=0, image_size=64, seed=3, show_progress=False)
    dataset = coco_dataset.build_dataset(str(root), "train", train=True)
    loader = build_train_loader(dataset, 2, 0, seed=0, aspect_ratio_grouping=False)
    loader.batch_sampler.set_epoch(0)
    return list(loader)


def test_host_read_counter_sees_each_kind_of_read_and_its_line():
    x = torch.arange(6.0)
    # What torch.Tensor itself defines (its read methods are inherited from the C base class).
    own_methods = {name: torch.Tensor.__dict__.get(name) for name in host_sync.READ_METHODS + host_sync.MASK_METHODS}
    with host_sync.HostReadCounter() as counter:
        x.sum().item()
        float(x[0])
        bool(x.any())
        x.tolist()
        x[x > 2]          # boolean mask: data-dependent size
        x[1:3]            # a slice is not a read
    methods = [read.method for read in counter.reads]
    assert methods == ["item", "__float__", "__bool__", "tolist", "__getitem__[bool mask]"]
    assert all(read.file == "tests/tools/test_host_sync.py" and read.kind == "unexpected" for read in counter.reads)
    assert "x.sum().item()" in counter.reads[0].source
    # Patches removed: torch.Tensor's own attributes are exactly what they were, and reads work untracked.
    assert {name: torch.Tensor.__dict__.get(name) for name in own_methods} == own_methods
    assert bool(torch.ones(())) and counter.reads[-1].method == "__getitem__[bool mask]"
    with host_sync.HostReadCounter(device_only=True) as counter:
        x.sum().item()
    assert counter.reads == []  # a CPU tensor is not a device read


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_training_step_reads_only_the_guard_and_the_log(batches, tmp_path, optimizer_name):
    torch.manual_seed(0)
    model = build_retinanet(**SMALL).optimize_for("cpu").train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=1e-3, momentum=0.9) if optimizer_name == "sgd"
                 else torch.optim.AdamW(params, lr=1e-4))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    config = TrainConfig(epochs=1, print_freq=2, output_dir=str(tmp_path), warmup_iters=0)
    result = host_sync.count_training_reads(model, batches, "cpu", optimizer, scaler, config)
    assert result["steps"] == 4 and result["log_records"] == 2  # iterations 2 and 4
    assert result["unexpected_sites"] == [], "\n".join(result["unexpected_sites"])
    assert result["reads"]["non_finite_guard"] == result["expected"]["non_finite_guard"] == 4
    assert result["reads"]["logging"] == result["expected"]["logging"] == 4  # two loss terms, twice
    # RetinaNet.forward checks the targets (4 reads per image with boxes) before they go to the device.
    assert result["reads"]["host_side_target_checks"] > 0
    # Adam reads its host-side step counters (not a sync on a GPU either); SGD keeps none.
    assert (result["reads"]["optimizer_host_counters"] > 0) == (optimizer_name == "adamw")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_training_step_synchronises_once_per_step_on_cuda(batches, tmp_path):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_retinanet(**SMALL).to(device).optimize_for(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    pinned = [([image.pin_memory() for image in images],
               [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets], bad)
              for images, targets, bad in batches]
    for amp_dtype in (None, torch.float16):
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
        config = TrainConfig(epochs=1, print_freq=2, output_dir=str(tmp_path), warmup_iters=0)
        result = host_sync.count_training_reads(model, pinned, device, optimizer, scaler, config, amp_dtype)
        assert result["unexpected_sites"] == [], result
        assert result["reads"]["non_finite_guard"] == result["steps"]
        sync = result["cuda_sync_debug"]
        assert sync["synchronisations"] <= sync["allowed"], sync
