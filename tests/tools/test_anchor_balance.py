"""tools/anchor_balance.py: foreground / background anchors as training assigns them, and the imbalance of
the demo data's presets (the sparse one is COCO-like: at most 1 foreground anchor in 1,000)."""
import sys
from pathlib import Path

import pytest
import torch

import coco_dataset
from model.config import ModelConfig
from model.retinanet import RetinaNet
from recipes import resolve_config
from train_options import get_args_parser as train_args_parser
from utils.boxes.matcher import BACKGROUND, IGNORE
from utils.data.demo_data import PRESETS, generate_demo_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from anchor_balance import anchor_balance, dataset_anchor_balance, format_balance  # noqa: E402


@torch.no_grad()
def model_counts(model, data_path: str, split: str) -> dict:
    """The reference: every image through the model's own transform, backbone, FPN, anchor generator
    and loss matcher, one image per batch (as training pads a batch of one)."""
    dataset = coco_dataset.build_dataset(data_path, split)
    counts = {"foreground": 0, "background": 0, "ignored": 0}
    feature_sizes = {}  # per padded input size: the network runs once per size (CPU time)
    for index in range(len(dataset)):
        image, target = dataset[index]
        batch, _, targets = model.transform([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
        size = tuple(batch.shape[-2:])
        if size not in feature_sizes:
            feature_sizes[size] = [tuple(f.shape[-2:]) for f in model.fpn(model.backbone(batch))]
        anchors = model.anchor_generator(size, feature_sizes[size])
        matched, _, _ = model.loss.match(anchors, targets)
        counts["foreground"] += int((matched >= 0).sum())
        counts["background"] += int((matched == BACKGROUND).sum())
        counts["ignored"] += int((matched == IGNORE).sum())
    return counts


@pytest.mark.parametrize("image_size,preset,min_size,max_size", [
    ((72, 100), None, 64, 100),        # resized to 64 x 88, padded to 128 x 128
    ((200, 260), "large", 150, 200),   # sizes vary per image: several paddings; 20-60 boxes per image
])
def test_counts_equal_the_models_own_matching(tmp_path, image_size, preset, min_size, max_size):
    generate_demo_dataset(str(tmp_path), num_train=1, num_val=4, image_size=image_size, preset=preset, seed=3,
                          show_progress=False)
    config = ModelConfig(num_classes=4, backbone="resnet18", fpn_channels=16, head_convs=1, num_extra_levels=1,
                         anchor_base_sizes=(16, 32, 64, 128), min_size=min_size, max_size=max_size)
    model = RetinaNet.from_config(config).eval()
    balance = dataset_anchor_balance(str(tmp_path), "val", config)
    expected = model_counts(model, str(tmp_path), "val")
    assert {key: balance[key] for key in expected} == expected and expected["foreground"] > 0
    assert balance["ratio"] == expected["background"] / expected["foreground"] and balance["images"] == 4


def test_no_box_means_no_foreground():
    arrays = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long),
              "image_index": torch.zeros(0, dtype=torch.long), "image_sizes": torch.tensor([[128.0, 128.0]])}
    balance = anchor_balance(arrays, ModelConfig(anchor_base_sizes=(16, 32, 64, 128), num_extra_levels=1, min_size=128,
                                                 max_size=128))
    # 16x16 + 8x8 + 4x4 + 2x2 locations x 9 anchors, all background.
    assert balance["foreground"] == 0 and balance["background"] == 340 * 9 and balance["ratio"] == float("inf")
    assert format_balance(balance).startswith("foreground anchors no foreground")


def _demo_recipe(data_path: str, train_size: int) -> ModelConfig:
    flags = ["--recipe", "demo", "--data-path", data_path, "--min-size", str(train_size), "--max-size",
             str(train_size)]
    return resolve_config(train_args_parser().parse_args(flags)).model


def test_the_sparse_preset_is_as_imbalanced_as_coco_and_the_demo_stays_as_it_was(tmp_path):
    """60 val images of each, the demo recipe's anchors (16..128 px on P3-P6, 3 scales, 3 ratios)."""
    sparse, demo = str(tmp_path / "sparse"), str(tmp_path / "demo")
    generate_demo_dataset(sparse, num_train=1, num_val=60, preset="sparse", show_progress=False)
    generate_demo_dataset(demo, num_train=1, num_val=60, show_progress=False)
    sparse_balance = dataset_anchor_balance(sparse, "val", _demo_recipe(sparse, PRESETS["sparse"]["train_size"]))
    demo_balance = dataset_anchor_balance(demo, "val", _demo_recipe(demo, 128))
    assert sparse_balance["ratio"] >= 1000          # at most 1 foreground anchor in 1,000 (COCO's order)
    assert 80 <= demo_balance["ratio"] <= 200       # the demo: about 1 in 124 (docs, full val split)
    assert sparse_balance["foreground"] >= 60       # still objects to learn from: about 1.3 per image
    assert format_balance(demo_balance).startswith(f"foreground anchors 1 : {demo_balance['ratio']:.0f} (")
