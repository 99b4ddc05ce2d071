"""train.py --crop-size end to end: the windows drive the epochs, the checkpoint says the model was
trained on crops, and a killed run resumes bit for bit (utils/data/crops.py, recipes.py, train.py)."""
import json

import pytest
import torch

import train
from model import build_retinanet
from recipes import resolve_config
from test_train import (FakeTrainSet, final_weights, resume_and_check_position, run, run_killed_after_writing,
                        train_command)
from train_options import get_args_parser
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

# 64 px windows of 96 x 128 images: 2 x 2 windows an image, 24 an epoch, 6 steps of 4. Every crop
# augmentation is on, so every random draw of the crop path must be restored by a resume.
CROP_ARGS = ("--crop-size", "64", "--epochs", "1", "--checkpoint-every", "2", "--vflip-prob", "0.5",
             "--rot90-prob", "0.5", "--colour-jitter", "0.2", "--scale-jitter", "0.8", "1.25", "--min-visible", "0.4")


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crop_data")
    generate_demo_dataset(root, num_train=6, num_val=2, image_size=(96, 128), seed=5, show_progress=False)
    return str(root)


@pytest.fixture(scope="module")
def uninterrupted(wide_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("crop_uninterrupted")
    result = run(train_command(wide_data, out, *CROP_ARGS))
    return out, result.stdout + result.stderr


@pytest.mark.slow
def test_crop_training_counts_windows_and_records_its_window_in_the_checkpoint(uninterrupted):
    out, output = uninterrupted
    assert "crop training: 24 windows of 64 x 64 px an epoch from 6 images at scale 1" in output
    assert "6 iterations: 1 epoch(s) of 6 iterations, 24 windows" in output
    for path in (out / "model_final.pth", list_checkpoints(str(out))[0]):
        model_config = load_checkpoint(str(path))["model_config"]
        assert (model_config["crop_size"], model_config["crop_scale"]) == (64, 1.0)
        assert model_config["min_size"] == 64 and model_config["max_size"] == 64
    args = load_checkpoint(str(out / "model_final.pth"))["args"]
    assert args["scale_jitter"] == [0.8, 1.25] and args["min_visible"] == 0.4 and args["rot90_prob"] == 0.5
    metrics = json.loads((out / "eval_val" / "metrics.json").read_text())  # whole validation images
    assert "AP" in metrics


@pytest.mark.slow
def test_killed_crop_run_resumes_bit_for_bit(wide_data, uninterrupted, tmp_path):
    reference = final_weights(uninterrupted[0])
    run_killed_after_writing(train_command(wide_data, tmp_path, *CROP_ARGS), "checkpoint_e0000_i00000002")
    assert not (tmp_path / "model_final.pth").exists()
    state = resume_and_check_position(train_command(wide_data, tmp_path, *CROP_ARGS, "--resume", "auto"), tmp_path)
    assert state["iteration"] == 2 and state["batch_in_epoch"] == 2  # mid-epoch
    resumed = final_weights(tmp_path)
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


def test_fine_tuning_a_crop_trained_model_on_whole_images_forgets_its_window(tmp_path):
    """The crop window describes the run, not the weights: without --crop-size the model trains (and
    will predict) on whole images, so inference must not tile it."""
    source = build_retinanet(num_classes=2, backbone="resnet18", fpn_channels=32, head_convs=1, num_extra_levels=1,
                             anchor_base_sizes=(16, 32, 64, 128), min_size=256, max_size=256, crop_size=256,
                             crop_scale=0.5)
    path = tmp_path / "crops.pth"
    save_checkpoint({"model": source.state_dict(), "model_config": source.config,
                     "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, str(path))

    def build(*argv):
        config = resolve_config(get_args_parser().parse_args(["--data-path", "/unused", "--weights", str(path), *argv]))
        return train.build_model(config, FakeTrainSet()).model_config

    whole = build()
    assert (whole.crop_size, whole.crop_scale, whole.min_size) == (0, 1.0, 800)
    crops = build("--crop-size", "128", "--scale", "0.25")
    assert (crops.crop_size, crops.crop_scale, crops.min_size, crops.max_size) == (128, 0.25, 128, 128)
