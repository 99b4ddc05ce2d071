"""Recipe and option resolution: command line -> one frozen TrainConfig (recipes.py)."""
import dataclasses
import os

import pytest

from recipes import DEMO_DATASET, RECIPES, TrainConfig, resolve_config
from train_options import get_args_parser
from utils.runtime.errors import ConfigError


def resolve(*argv):
    return resolve_config(get_args_parser().parse_args(list(argv)))


def test_no_dataset_means_the_demo_recipe_on_generated_data():
    config = resolve()
    assert config.recipe == "demo" and config.demo_data and config.data_path == "data/demo"
    assert config.model.backbone == "resnet18" and config.model.head_norm == "gn" and config.model.min_size == 128
    assert config.optimizer == "adamw" and config.lr == 2e-3 and config.epochs == 4 and config.schedule == "cosine"
    assert config.pretrained_backbone is None and config.given == frozenset()


def test_a_data_path_means_the_coco_recipe_with_linear_lr_scaling():
    config = resolve("--data-path", "/data/coco")
    assert config.recipe == "coco" and not config.demo_data
    assert (config.train_split, config.val_split) == ("train2017", "val2017")
    assert config.model.backbone == "resnet50" and config.model.min_size == 800 and config.model.max_size == 1333
    assert config.pretrained_backbone == "DEFAULT" and config.epochs == 12 and config.lr_steps == (8, 11)
    assert config.lr == pytest.approx(0.01)
    assert resolve("--data-path", "/d", "--batch-size", "32").lr == pytest.approx(0.02)
    assert resolve("--data-path", "/d", "--schedule", "3x").epochs == 36


def test_demo_recipe_on_your_own_data_and_every_flag_still_overrides():
    config = resolve("--recipe", "demo", "--data-path", "/my/data", "--train-split", "tr", "--fpn-channels", "64",
                     "--min-size", "96", "112", "--lr", "0.001")
    assert config.recipe == "demo" and not config.demo_data and config.data_path == "/my/data"
    assert config.model.backbone == "resnet18" and config.model.fpn_channels == 64  # recipe, then the flag
    assert config.model.min_size == (96, 112) and config.lr == 0.001 and config.train_split == "tr"
    assert config.val_split == "val"  # the demo recipe's name for it
    with pytest.raises(ConfigError, match="needs --data-path"):
        resolve("--recipe", "coco")


def test_demo_recipe_on_your_own_data_trains_from_scratch_with_the_demo_schedule():
    config = resolve("--recipe", "demo", "--data-path", "/my/data")
    demo = resolve()
    assert config.pretrained_backbone is None and config.model.backbone_norm == "auto"  # trainable BN, no download
    same = ("model", "optimizer", "lr", "weight_decay", "epochs", "schedule", "warmup_iters", "batch_size", "workers")
    assert {key: getattr(config, key) for key in same} == {key: getattr(demo, key) for key in same}
    assert config.given == frozenset({"recipe", "data_path"})
    # ImageNet weights (or any other coco-recipe setting) are one flag away.
    assert resolve("--recipe", "demo", "--data-path", "/d", "--pretrained-backbone", "DEFAULT").pretrained_backbone \
        == "DEFAULT"
    assert resolve("--recipe", "coco", "--data-path", "/d").model == resolve("--data-path", "/d").model


def test_a_flag_equal_to_the_default_still_counts_as_given():
    config = resolve("--box-loss", "smooth_l1", "--data-path", "/d")
    assert "box_loss" in config.given and ("box_loss", "smooth_l1") in config.weights_overrides
    # With --weights, only explicit values (and the recipe's input size) go on top of the weights' own.
    overrides = dict(resolve("--data-path", "/d").weights_overrides)
    assert overrides == {"min_size": 800, "max_size": 1333}
    assert "backbone" not in overrides and "anchor_base_sizes" not in overrides


def test_the_config_is_frozen_and_serialises_flat():
    config = resolve("--data-path", "/d", "--head-norm", "gn")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.fpn_channels = 1
    flat = config.to_dict()
    assert flat["head_norm"] == "gn" and flat["data_path"] == "/d" and flat["given"] == ["data_path", "head_norm"]
    assert flat["anchor_base_sizes"] == RECIPES["coco"]["anchor_base_sizes"]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--hflip-prob", "1.5"], "--hflip-prob 1.5"),
    (["--anchor-base-sizes", "16", "32"], "4 pyramid levels need 4 anchor_base_sizes"),
    (["--schedule", "steps"], "needs --lr-steps"),
])
def test_bad_options_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(*argv)


@pytest.mark.parametrize("setting,num_images,limit", [(None, 500, 10), (None, 50_000, 50), (0.01, 1000, 10),
                                                       (3, 10, 3), (0, 100, 0)])
def test_bad_image_budget_allows_a_few_images_on_small_datasets(setting, num_images, limit):
    assert TrainConfig(max_bad_images=setting).bad_image_limit(num_images) == limit


def test_demo_scale_shrinks_the_demo_data_iterations_and_warmup_into_folders_of_their_own():
    full = resolve()
    assert full.demo_scale == 1 and full.demo_dataset() == DEMO_DATASET == dict(num_train=3000, num_val=300,
                                                                                  image_size=160, seed=0)
    assert full.output_dir == os.path.abspath("output/demo") and full.warmup_iters == 200
    assert resolve("--demo-scale", "1") == dataclasses.replace(full, demo_scale=1.0, given=frozenset({"demo_scale"}))
    small = resolve("--demo-scale", "0.01")
    assert small.demo_data and small.data_path == "data/demo-0.01" and small.output_dir == os.path.abspath(
        "output/demo-0.01")
    assert small.demo_dataset() == {**DEMO_DATASET, "num_train": 30, "num_val": 3} and small.warmup_iters == 2
    assert dataclasses.replace(small, data_path=full.data_path, output_dir=full.output_dir, warmup_iters=200,
                               demo_scale=1.0, given=frozenset()) == full  # nothing else changes
    given = resolve("--demo-scale", "0.01", "--output-dir", "o", "--warmup-iters", "5")
    assert given.output_dir == os.path.abspath("o") and given.warmup_iters == 5
    assert resolve("--demo-scale", "0.0001").demo_dataset()["num_val"] == 1


@pytest.mark.parametrize("argv,message", [
    (["--demo-scale", "0"], "must be in"), (["--demo-scale", "1.5"], "must be in"),
    (["--demo-scale", "0.1", "--data-path", "/d"], "neither --data-path"),
    (["--demo-scale", "0.1", "--recipe", "coco"], "neither --data-path"),
])
def test_demo_scale_applies_to_the_built_in_demo_only(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve(*argv)


def test_crop_size_makes_the_model_take_its_windows_as_they_are():
    config = resolve("--data-path", "/d", "--crop-size", "512", "--scale", "0.5", "--min-visible", "0.3")
    assert (config.model.crop_size, config.model.crop_scale) == (512, 0.5)
    assert config.model.min_size == 512 and config.model.max_size == 512 and config.model.fixed_size is None
    assert config.min_visible == 0.3 and config.crop_object_prob == 0.5 and config.scale_jitter is None
    assert resolve("--data-path", "/d", "--crop-size", "256", "--min-size", "256", "--max-size", "256").model.min_size \
        == 256  # an explicit size that agrees is fine
    jittered = resolve("--data-path", "/d", "--crop-size", "256", "--scale-jitter", "0.8", "1.25")
    assert jittered.scale_jitter == (0.8, 1.25) and jittered.to_dict()["scale_jitter"] == [0.8, 1.25]
    plain = resolve("--data-path", "/d")  # without --crop-size nothing changes
    assert (plain.model.crop_size, plain.model.crop_scale, plain.vflip_prob, plain.rot90_prob, plain.colour_jitter) \
        == (0, 1.0, 0.0, 0.0, 0.0)


def test_the_large_recipe_trains_the_demo_detector_on_native_resolution_windows():
    config = resolve("--recipe", "large", "--data-path", "/aerial")
    demo = resolve()
    assert config.recipe == "large" and not config.demo_data and config.data_path == "/aerial"
    assert (config.model.crop_size, config.model.crop_scale, config.model.min_size, config.model.max_size) == \
        (256, 1.0, 256, 256)
    assert (config.vflip_prob, config.rot90_prob, config.colour_jitter, config.hflip_prob) == (0.5, 0.5, 0.2, 0.5)
    assert config.model.detections_per_img == 300 and config.batch_size == 8 and config.pretrained_backbone is None
    same = ("backbone", "fpn_channels", "num_extra_levels", "anchor_base_sizes", "head_convs", "head_norm")
    assert all(getattr(config.model, key) == getattr(demo.model, key) for key in same)
    assert (config.optimizer, config.lr, config.schedule) == (demo.optimizer, demo.lr, demo.schedule)
    assert resolve("--recipe", "large", "--data-path", "/d", "--crop-size", "384").model.max_size == 384
    with pytest.raises(ConfigError, match="--recipe large needs --data-path"):
        resolve("--recipe", "large")


@pytest.mark.parametrize("argv,message", [
    (["--crop-size", "16"], r"--crop-size 16: must be in \[32, 4096\]"),
    (["--crop-size", "5000"], "more memory per step"),
    (["--crop-size", "256", "--min-size", "800"], "--min-size 800 contradicts --crop-size 256"),
    (["--crop-size", "256", "--max-size", "1333"], "--max-size 1333 contradicts --crop-size 256"),
    (["--crop-size", "256", "--crop-scale", "0"], "--crop-scale 0.0: must be > 0"),
    (["--crop-size", "256", "--min-visible", "0"], r"--min-visible 0.0: must be in \(0, 1\]"),
    (["--crop-size", "256", "--min-visible", "1.5"], "--min-visible 1.5"),
    (["--crop-size", "256", "--scale-jitter", "1.5", "0.5"], "0 < LO <= HI"),
    (["--min-visible", "0.3"], "--min-visible applies to crop training only"),
    (["--scale", "0.5"], "--crop-scale applies to crop training only"),
    (["--rot90-prob", "2"], "--rot90-prob 2.0: must be in"),
    (["--colour-jitter", "1"], "--colour-jitter 1.0: must be in"),
])
def test_bad_crop_and_augmentation_options_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        resolve("--data-path", "/d", *argv)
