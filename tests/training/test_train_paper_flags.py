"""train.py with the paper's knobs: --iters schedules, --cls-loss ce against its focal-loss twin,
and --prior-prob 0 (trains, or stops with the one-line non-finite-loss error)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from recipes import resolve_config
from train_options import get_args_parser
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.checkpoint import load_checkpoint
from utils.runtime.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--train-split", "train", "--val-split", "val", "--workers", "0", "--batch-size", "4", "--print-freq", "1",
        "--num-threads", "1", "--backbone", "resnet18", "--pretrained-backbone", "none", "--fpn-channels", "32",
        "--head-convs", "1", "--head-norm", "gn", "--num-extra-levels", "1", "--anchor-base-sizes", "16", "32", "64",
        "128", "--min-size", "64", "--max-size", "64"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_flags_coco")
    generate_demo_dataset(root, num_train=12, num_val=4, image_size=64, seed=1, show_progress=False)
    return str(root)


def train_py(data, out, *extra):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", data, "--output-dir", str(out), *TINY, *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_iters_is_the_schedule_length_and_ends_with_final_weights_and_evaluation(tiny_data, tmp_path):
    # 12 images at batch 4: 3 iterations per epoch, so 5 iterations end part-way through epoch 2.
    result = train_py(tiny_data, tmp_path, "--iters", "5", "--schedule", "cosine", "--warmup-iters", "1",
                      "--optimizer", "adamw", "--lr", "1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training 5 iterations: 2 epoch(s) of 3 iterations" in result.stdout
    final = load_checkpoint(str(tmp_path / "model_final.pth"))
    assert final["iteration"] == 5 and final["args"]["iters"] == 5
    records = log_records(tmp_path)
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["iteration"] for r in train_records] == [1, 2, 3, 4, 5]
    assert train_records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end at 5
    assert records[-1]["type"] == "eval" and records[-1]["iteration"] == 5
    assert (tmp_path / "eval_val" / "metrics.json").is_file()


def test_iters_and_epochs_exclude_each_other():
    args = get_args_parser().parse_args(["--iters", "10", "--epochs", "2"])
    with pytest.raises(ConfigError, match="--iters and --epochs exclude each other"):
        resolve_config(args)
    config = resolve_config(get_args_parser().parse_args(["--iters", "10", "--schedule", "1x"]))
    assert config.total_iters(3) == 10 and config.num_epochs(3) == 4
    assert resolve_config(get_args_parser().parse_args(["--epochs", "2"])).total_iters(3) == 6


@pytest.mark.slow
def test_ce_trains_exactly_like_focal_with_gamma_0_and_no_alpha_also_without_a_prior(tiny_data, tmp_path):
    """--cls-loss ce is the focal loss at gamma 0 without alpha, bit for bit, also from --prior-prob 0
    (bias 0). Both runs must train (3 small SGD steps do not diverge); the diverging run's one-line
    stop is test_a_diverging_run_without_prior_stops_with_one_line's."""
    common = ["--iters", "3", "--prior-prob", "0", "--optimizer", "sgd", "--lr", "0.01", "--warmup-iters", "0"]
    ce = train_py(tiny_data, tmp_path / "ce", "--cls-loss", "ce", *common)
    focal = train_py(tiny_data, tmp_path / "focal", "--cls-loss", "focal", "--focal-gamma", "0",
                     "--focal-alpha", "-1", *common)
    assert ce.returncode == 0, ce.stderr[-3000:]
    assert focal.returncode == 0, focal.stderr[-3000:]
    ce_state, focal_state = (load_checkpoint(str(tmp_path / run / "model_final.pth")) for run in ("ce", "focal"))
    assert ce_state["model_config"]["cls_loss"] == "ce" and ce_state["model_config"]["prior_prob"] == 0
    assert (ce_state["model"]["head.cls_logits.bias"] != 0).any()  # it trained from bias 0
    for key, value in ce_state["model"].items():
        torch.testing.assert_close(focal_state["model"][key], value, rtol=0, atol=0, msg=key)
    ce_losses = [r["classification"] for r in log_records(tmp_path / "ce") if r["type"] == "train"]
    focal_losses = [r["classification"] for r in log_records(tmp_path / "focal") if r["type"] == "train"]
    assert len(ce_losses) == 3 and all(math.isfinite(loss) for loss in ce_losses) and ce_losses == focal_losses


@pytest.mark.slow
def test_a_diverging_run_without_prior_stops_with_one_line(tiny_data, tmp_path):
    result = train_py(tiny_data, tmp_path, "--cls-loss", "ce", "--prior-prob", "0", "--iters", "6",
                      "--optimizer", "sgd", "--lr", "1e6", "--warmup-iters", "0", "--max-non-finite", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "non-finite losses in a row" in error_lines[0]
    assert not (tmp_path / "model_final.pth").exists()
