"""Runs that survive kills, preemption, corrupt checkpoints and corrupt images (issue: reliability)."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

import coco_dataset
from test_ddp import first_batches
from test_train import REPO, final_weights, resume_and_check_position, run, run_killed_after_writing, train_command
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.checkpoint import CheckpointError, find_resumable_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco_rel")
    generate_demo_dataset(root, num_train=12, num_val=4, image_size=64, seed=2, show_progress=False)
    return str(root)


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# Data-loading workers and multi-scale training: a resumed run must restore the RNG state (the scale
# of each image is drawn in the main process) and the position in the epoch to match.
RESUME_ARGS = ("--epochs", "2", "--checkpoint-every", "2", "--workers", "1", "--min-size", "48", "56", "64")


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """Final weights of the run the killed runs must reproduce (3 iterations an epoch, 2 epochs)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(train_command(tiny_data, out, *RESUME_ARGS))
    return final_weights(out)


@pytest.mark.parametrize("kill_at,where", [("checkpoint_e0000_i00000002", "mid-epoch"),
                                           ("checkpoint_e0001_i00000003", "after epoch 1")])
@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted(kill_at, where, tiny_data, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    run_killed_after_writing(train_command(tiny_data, killed, *RESUME_ARGS), kill_at)
    assert not (killed / "model_final.pth").exists() and kill_at in list_checkpoints(str(killed))[0]
    state = resume_and_check_position(train_command(tiny_data, killed, *RESUME_ARGS, "--resume", "auto"), killed)
    assert state["iteration"] < 6 and state["rng"] is not None  # there was work left to resume
    resumed = final_weights(killed)
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=f"{where}: {key}")


@pytest.mark.slow
def test_sigterm_writes_loadable_checkpoint_and_exits_zero(tiny_data, tmp_path):
    proc = subprocess.Popen(train_command(tiny_data, tmp_path, "--epochs", "50"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: (tmp_path / "log.jsonl").exists() and
                    len((tmp_path / "log.jsonl").read_text().splitlines()) >= 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "SIGTERM received" in output
    state = load_checkpoint(list_checkpoints(str(tmp_path))[0])
    assert state["iteration"] >= 2 and "model" in state
    assert not (tmp_path / "model_final.pth").exists()


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path):
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, str(tmp_path / "checkpoint_e0001_i00000010.pth"))
    save_checkpoint({"model": {"w": torch.ones(3) * 2}, "epoch": 2}, str(tmp_path / "checkpoint_e0002_i00000020.pth"))
    latest = tmp_path / "checkpoint_e0002_i00000020.pth"
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(str(latest))
    path, state = find_resumable_checkpoint(str(tmp_path))
    assert path.endswith("checkpoint_e0001_i00000010.pth") and state["epoch"] == 1


@pytest.mark.slow
def test_truncated_checkpoint_resume_auto_continues_training(tiny_data, tmp_path):
    run(train_command(tiny_data, tmp_path, "--epochs", "2", "--checkpoint-every", "1", "--max-iters", "4"))
    newest, previous = list_checkpoints(str(tmp_path))[:2]
    assert (load_checkpoint(newest)["iteration"], load_checkpoint(previous)["iteration"]) == (4, 3)
    with open(newest, "r+b") as f:
        f.truncate(64)
    result = run(train_command(tiny_data, tmp_path, "--epochs", "2", "--resume", "auto"))
    output = result.stdout + result.stderr
    assert "skipping unusable checkpoint" in output
    # It goes on from the previous checkpoint (3 iterations an epoch), not from scratch: the log holds the
    # first run's iterations 1-4, then the resumed run's 4-6, and the final weights are of iteration 6.
    assert "resumed at epoch 1, batch 0, iteration 3" in output
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 4, 5, 6]
    assert load_checkpoint(str(tmp_path / "model_final.pth"))["iteration"] == 6


@pytest.fixture()
def data_with_corrupt_images(tmp_path):
    root = tmp_path / "corrupt"
    generate_demo_dataset(root, num_train=40, num_val=4, image_size=64, seed=3, show_progress=False)
    with open(root / "annotations" / "instances_train.json") as f:
        names = [image["file_name"] for image in json.load(f)["images"]]
    bad = [names[5], names[17]]
    (root / "train" / bad[0]).write_bytes(b"not a jpeg at all")
    data = (root / "train" / bad[1]).read_bytes()
    (root / "train" / bad[1]).write_bytes(data[: len(data) // 3])
    return str(root), bad


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted(data_with_corrupt_images, tmp_path):
    data, bad = data_with_corrupt_images
    result = run(train_command(data, tmp_path, "--epochs", "1", "--max-bad-images", "5", "--batch-size", "8"))
    output = result.stdout + result.stderr
    for name in bad:
        assert name in output
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(r.get("bad_images", 0) for r in records) == 2
    assert (tmp_path / "model_final.pth").exists()


@pytest.mark.slow
def test_too_many_corrupt_images_stop_with_clear_error(data_with_corrupt_images, tmp_path):
    data, bad = data_with_corrupt_images
    cmd = train_command(data, tmp_path, "--epochs", "1", "--max-bad-images", "1", "--batch-size", "8")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "more than --max-bad-images 1" in result.stderr
    assert all(name in result.stdout + result.stderr for name in bad)


@pytest.mark.slow
def test_killed_run_keeps_counting_bad_images_after_resume(tmp_path):
    """The counters live in the checkpoint: a resumed run continues the bad-image count (and the
    --max-bad-images budget) where the killed one left it, instead of starting again at 0."""
    root = tmp_path / "data"
    generate_demo_dataset(root, num_train=24, num_val=4, image_size=64, seed=4, show_progress=False)
    dataset = coco_dataset.build_dataset(str(root), "train", train=True)
    batches = first_batches(dataset, rank=0, count=3, batch_per_rank=4, world_size=1)
    for name in (batches[0][1], batches[2][3]):  # read in iterations 1 and 3 of the first epoch
        (root / "train" / name).write_bytes(b"not an image")
    args = ("--epochs", "2", "--checkpoint-every", "1", "--max-bad-images", "4")
    killed = tmp_path / "killed"
    run_killed_after_writing(train_command(str(root), killed, *args), "_i00000004")
    at_kill = load_checkpoint(list_checkpoints(str(killed))[0])
    assert at_kill["bad_images"] == 2 and at_kill["iteration"] == 4
    result = run(train_command(str(root), killed, *args, "--resume", "auto"))
    assert "2 bad images" in result.stdout + result.stderr  # the resume line reports the restored count

    def last_count(out):
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [r for r in records if r["type"] == "train"][-1]["bad_images"]

    # Both images, once per epoch (an uninterrupted run's count); counting from 0 again would end at 2.
    assert last_count(killed) == 4
