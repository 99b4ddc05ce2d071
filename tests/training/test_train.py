"""train.py end to end on a tiny synthetic COCO-format dataset (CPU)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from model.config import LEGACY_EXECUTION_KEYS
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.checkpoint import list_checkpoints, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = ["--backbone", "resnet18", "--pretrained-backbone", "none", "--fpn-channels", "32",
              "--head-convs", "1", "--head-norm", "gn", "--num-extra-levels", "1",
              "--anchor-base-sizes", "16", "32", "64", "128", "--min-size", "64", "--max-size", "64"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    generate_demo_dataset(root, num_train=12, num_val=4, image_size=64, seed=1, show_progress=False)
    return str(root)


def train_command(data, out, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--data-path", data, "--train-split", "train",
            "--val-split", "val", "--output-dir", str(out), "--workers", "0", "--batch-size", "4",
            "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0", "--warmup-iters", "2",
            "--schedule", "cosine", "--eval-interval", "0", "--print-freq", "1", "--num-threads", "1",
            *TINY_MODEL, *extra]


def run(cmd, **kwargs):
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_iterations_write_a_checkpoint_and_log(tiny_data, tmp_path):
    run(train_command(tiny_data, tmp_path, "--epochs", "1", "--max-iters", "2"))
    checkpoints = list_checkpoints(str(tmp_path))
    assert checkpoints, os.listdir(tmp_path)
    state = load_checkpoint(checkpoints[0])
    assert state["iteration"] == 2 and state["epoch"] == 0 and state["batch_in_epoch"] == 2
    assert {c["id"] for c in state["categories"]} == {1, 3, 7, 12}
    for key in ("model", "optimizer", "lr_scheduler", "scaler", "args", "model_config"):
        assert key in state
    assert state["args"]["backbone"] == "resnet18"
    assert not set(LEGACY_EXECUTION_KEYS) & set(state["model_config"])  # how a model runs is not saved
    assert {"bad_images", "non_finite_steps", "consecutive_non_finite"} <= set(state)  # TrainState's counters
    log_lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log_lines) == 2 and '"loss"' in log_lines[0]


def final_weights(out):
    return load_checkpoint(os.path.join(out, "model_final.pth"))["model"]


# ``python -c KILL_AFTER_WRITING MARKER SCRIPT ARGS``: runs SCRIPT as ``python SCRIPT ARGS`` would, and the
# process SIGKILLs itself as soon as a file whose name contains MARKER has been renamed into place (every
# checkpoint is written to a temporary file and renamed, utils.runtime.atomic_io). The kill lands at that
# point on any machine, however fast, instead of wherever a polling test happens to catch the run.
KILL_AFTER_WRITING = """
import os, runpy, signal, sys
marker = sys.argv.pop(1)
rename = os.replace

def rename_then_die(source, destination, *args, **kwargs):
    rename(source, destination, *args, **kwargs)
    if marker in os.path.basename(os.fspath(destination)):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = rename_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed_after_writing(command: list, marker: str) -> None:
    """Run ``command`` (``[python, script, *args]``) until it has written the file named ``*marker*``, where
    it is SIGKILLed; fails the test if the run ends any other way."""
    python, script, *args = command
    result = subprocess.run([python, "-c", KILL_AFTER_WRITING, marker, script, *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, (f"not killed after writing {marker} (exit {result.returncode}): "
                                                  + result.stdout[-2000:] + result.stderr[-2000:])


def resume_and_check_position(command, out_dir) -> dict:
    """Run ``command`` (a ``--resume auto`` run): it must say it resumed exactly at the newest checkpoint
    the killed run left. Returns that checkpoint."""
    state = load_checkpoint(list_checkpoints(str(out_dir))[0])
    result = run(command)
    expected = f"resumed at epoch {state['epoch']}, batch {state['batch_in_epoch']}, iteration {state['iteration']}"
    assert expected in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    return state


@pytest.mark.slow
def test_torchrun_two_cpu_processes_agree(tiny_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]  # a free port
    cmd += train_command(tiny_data, tmp_path, "--epochs", "1", "--device", "cpu")[1:]
    result = run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "all 2 ranks agree on the final weights" in result.stdout + result.stderr
    state = load_checkpoint(str(tmp_path / "model_final.pth"))
    assert state["args"]["world_size"] == 2


@pytest.mark.slow
def test_fine_tune_from_checkpoint_with_weights_flag(tiny_data, tmp_path):
    from model import build_retinanet
    from utils.runtime.checkpoint import save_checkpoint
    source = build_retinanet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, head_norm="gn",
                             num_extra_levels=1, anchor_base_sizes=(16, 32, 64, 128), min_size=64, max_size=64)
    with torch.no_grad():
        source.head.cls_logits.weight.fill_(0.123)
    categories = [{"id": 1, "name": "Circle"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cross"}]
    save_checkpoint({"model": source.state_dict(), "model_config": source.config, "categories": categories},
                    str(tmp_path / "source.pth"))
    out = tmp_path / "run"
    cmd = train_command(tiny_data, out, "--epochs", "1", "--max-iters", "1", "--weights", str(tmp_path / "source.pth"))
    result = run(cmd)
    assert "fine-tuning from" in result.stdout + result.stderr
    state = load_checkpoint(list_checkpoints(str(out))[0])
    assert state["model_config"]["fpn_channels"] == 32 and state["model"]["head.cls_logits.weight"].shape[0] == 9 * 4

    # An architecture flag that contradicts the weights is named, not silently ignored.
    cmd[cmd.index("--fpn-channels") + 1] = "64"
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--fpn-channels 64 contradicts --weights" in result.stderr and "fpn_channels = 32" in result.stderr


class FakeTrainSet:
    num_classes = 2
    categories = [{"id": 1, "name": "circle"}, {"id": 5, "name": "star"}]


@pytest.fixture(scope="module")
def giou_checkpoint(tmp_path_factory):
    """One of our checkpoints whose configuration trains with GIoU (as torchvision's v2 weights do)."""
    from model import build_retinanet
    from utils.runtime.checkpoint import save_checkpoint
    source = build_retinanet(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, box_loss="giou",
                             num_extra_levels=1, anchor_base_sizes=(16, 32, 64, 128), min_size=64, max_size=64)
    path = tmp_path_factory.mktemp("giou") / "giou.pth"
    save_checkpoint({"model": source.state_dict(), "model_config": source.config,
                     "categories": [{"id": i, "name": n} for i, n in enumerate(["circle", "square", "star"])]},
                    str(path))
    return str(path)


def build_from_command_line(*argv):
    import train
    from recipes import resolve_config
    from train_options import get_args_parser
    return train.build_model(resolve_config(get_args_parser().parse_args(list(argv))), FakeTrainSet())


def test_weights_with_an_explicit_box_loss_train_with_that_loss(giou_checkpoint):
    model = build_from_command_line("--data-path", "/unused", "--weights", giou_checkpoint)
    assert model.model_config.box_loss == "giou" and model.loss.box_loss == "giou"  # the weights' own
    model = build_from_command_line("--data-path", "/unused", "--weights", giou_checkpoint, "--box-loss", "smooth_l1")
    assert model.model_config.box_loss == "smooth_l1" and model.loss.box_loss == "smooth_l1"
    assert model.config["fpn_channels"] == 32 and model.num_classes == 2  # architecture from the weights
    assert model.model_config.min_size == 800  # the recipe's input size still applies


def test_weights_with_a_contradicting_architecture_flag_name_it(giou_checkpoint):
    from utils.runtime.errors import ConfigError
    with pytest.raises(ConfigError, match=r"--num-extra-levels 2 contradicts --weights .*num_extra_levels = 1"):
        build_from_command_line("--data-path", "/unused", "--weights", giou_checkpoint, "--num-extra-levels", "2")
    with pytest.raises(ConfigError, match="exclude each other"):
        build_from_command_line("--data-path", "/unused", "--weights", giou_checkpoint,
                                "--pretrained-backbone", "DEFAULT")


@pytest.mark.slow
def test_evaluation_script_on_a_trained_checkpoint_reproduces_the_training_evaluation(tiny_data, tmp_path):
    """``evaluation.py --checkpoint`` end to end: the model, the data path and the split come from the
    checkpoint alone, and the figures equal those train.py computed at the end of training."""
    # A high prior makes the barely trained model detect plenty, so there is something to compare.
    run(train_command(tiny_data, tmp_path, "--epochs", "1", "--amp", "bf16", "--prior-prob", "0.3"))
    during_training = json.loads((tmp_path / "eval_val" / "metrics.json").read_text())
    detections = json.loads((tmp_path / "eval_val" / "results.json").read_text())
    result = run([sys.executable, os.path.join(REPO, "evaluation.py"), "--checkpoint",
                  str(tmp_path / "model_final.pth"), "--output-dir", str(tmp_path / "again"), "--workers", "0",
                  "--batch-size", "4", "--amp", "bf16"])  # the batch training evaluated with
    assert "evaluating" in result.stdout and "COCO bbox evaluation" in result.stdout
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == during_training
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert len(detections) > 20 and len(again) == len(detections)
    for a, b in zip(sorted(again, key=lambda r: (r["image_id"], -r["score"])),
                    sorted(detections, key=lambda r: (r["image_id"], -r["score"]))):
        assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) < 1e-3
    assert set(during_training) >= {"AP", "AP50", "per_category"}


@pytest.mark.slow
def test_the_readme_demo_command_runs_end_to_end_at_toy_size(tmp_path):
    """``python train.py``, the README's first command (demo data generation, the demo recipe's real
    model, training, evaluation), shrunk by nothing but ``--demo-scale``; its default paths are
    relative to the working directory."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--demo-scale", "0.005"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data, out = tmp_path / "data" / "demo-0.005", tmp_path / "output" / "demo-0.005"
    for split, count in (("train", 15), ("val", 2)):  # 3000 and 300 images x 0.005
        annotations = json.loads((data / "annotations" / f"instances_{split}.json").read_text())
        assert len(annotations["images"]) == count and len(list((data / split).glob("*.jpg"))) == count
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    [evaluation] = [r for r in records if r["type"] == "eval"]
    assert train_records[-1]["epoch"] == 4 and evaluation["epoch"] == 4  # the demo recipe's 4 epochs
    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == train_records[-1]["iteration"] == evaluation["iteration"] > 0
    assert final["args"]["backbone"] == "resnet18" and final["args"]["demo_scale"] == 0.005  # the demo's model
    metrics = json.loads((out / "eval_val" / "metrics.json").read_text())
    assert 0 <= metrics["AP"] <= 1 and metrics["AP"] == evaluation["AP"]
    assert "COCO bbox evaluation" in result.stdout and f"epoch 4  AP {metrics['AP']:.4f}" in result.stdout
    assert f"final weights: {out / 'model_final.pth'}" in result.stdout
