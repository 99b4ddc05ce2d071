"""Checkpoints written before the redesign (execution settings inside ``model_config``) still load and detect the same.

``fixtures/legacy_checkpoints.json`` was recorded with the code of commit 5ffb3a0: for two small
configurations, the ``model_config`` that code wrote into checkpoints (with ``channels_last``,
``fold_batchnorm``, ``inference_channels_last``, ``compile_loss``, ``winograd``, ``pretrained_backbone``),
its state-dict keys, and its detections on two fixed images for the weights :func:`deterministic_state`
makes (a function of each key's name and shape, so the old and the new code build the same tensors).
"""
import json
import zlib
from pathlib import Path

import pytest
import torch

from model import build_retinanet, load_detector
from model.config import LEGACY_EXECUTION_KEYS
from utils.runtime.checkpoint import save_checkpoint

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "legacy_checkpoints.json").read_text())


def deterministic_state(template: dict) -> dict:
    """Weights as the fixture was recorded with: seeded by each key's name, scaled per kind of tensor."""
    state = {}
    for key in sorted(template):
        tensor = template[key]
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            value = torch.zeros_like(tensor)
        elif key.endswith("running_var"):
            value = torch.rand(tensor.shape, generator=generator) + 0.5
        elif key.endswith("running_mean"):
            value = torch.randn(tensor.shape, generator=generator) * 0.1
        elif tensor.dim() == 1 and key.endswith("weight"):
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif tensor.dim() == 1:
            value = 0.05 * torch.randn(tensor.shape, generator=generator)
        else:
            value = torch.randn(tensor.shape, generator=generator) * (1.0 / tensor[0].numel()) ** 0.5
            if key.startswith(("head.cls_logits", "head.bbox_pred")):
                value = value * 0.1
        state[key] = value.to(tensor.dtype)
    return state


def fixture_images():
    generator = torch.Generator().manual_seed(7)
    return [torch.rand(3, 70, 90, generator=generator), torch.rand(3, 64, 50, generator=generator)]


def old_layout_checkpoint(record: dict) -> dict:
    """A checkpoint with the keys train.py wrote before the redesign."""
    config = record["model_config"]
    model = build_retinanet(**{k: v for k, v in config.items() if k not in LEGACY_EXECUTION_KEYS})
    assert sorted(model.state_dict()) == record["state_dict_keys"]  # the same parameter names as then
    state = deterministic_state(model.state_dict())
    return {"model": state, "model_config": config, "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)],
            "optimizer": {}, "lr_scheduler": {}, "scaler": {}, "epoch": 3, "batch_in_epoch": 0, "iteration": 30,
            "args": {"data_path": "data/demo", "val_split": "val"}, "rng": None}


@pytest.mark.parametrize("name", sorted(FIXTURE))
@pytest.mark.parametrize("optimized", [False, True])
def test_old_checkpoint_loads_and_gives_the_recorded_detections(name, optimized, tmp_path):
    record = FIXTURE[name]
    assert set(LEGACY_EXECUTION_KEYS) <= set(record["model_config"])  # really the old layout
    path = tmp_path / "old.pth"
    save_checkpoint(old_layout_checkpoint(record), str(path))
    model, categories = load_detector(str(path))
    assert [c["id"] for c in categories] == [1, 2, 3]
    assert not set(LEGACY_EXECUTION_KEYS) & set(model.config)  # execution settings are not configuration
    if optimized:
        model.optimize_for("cpu")
    with torch.no_grad():
        detections = model(fixture_images())
    for got, expected in zip(detections, record["detections"]):
        assert len(got["scores"]) == len(expected["scores"]) > 0
        torch.testing.assert_close(got["scores"], torch.tensor(expected["scores"]), rtol=0, atol=1e-4)
        torch.testing.assert_close(got["boxes"], torch.tensor(expected["boxes"]), rtol=0, atol=1e-2)
        assert got["labels"].tolist() == expected["labels"]
