"""Offline starts: published weights neither cached nor downloadable stop with one line (issue 14, item 1).

No test touches the network: in-process tests replace torch.hub's downloader, subprocesses
get an empty TORCH_HOME and a proxy at a closed local port, so every download is refused.
"""
import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from model.backbone import ResNetBackbone
from model.weights import read_weights
from test_train import REPO, TINY_MODEL
from utils.data.demo_data import generate_demo_dataset
from utils.runtime.checkpoint import CheckpointError
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error
from utils.runtime.hub import WeightsUnavailableError, hub_cache_dir, weights_file_name

RESNET18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty hub cache in tmp_path and a downloader that always fails as DNS does without internet."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_backbone_weights_unavailable_name_the_file_the_cache_and_both_flags(offline):
    with pytest.raises(WeightsUnavailableError) as error:
        ResNetBackbone("resnet18", pretrained="DEFAULT")
    message = str(error.value)
    assert "\n" not in message and "ImageNet weights of the resnet18 backbone" in message
    assert f"copy resnet18-f37072fd.pth into {offline}" in message and hub_cache_dir() == str(offline)
    assert "--pretrained-backbone PATH" in message and "--pretrained-backbone none" in message
    assert "Name or service not known" in message  # the reason, for whoever debugs the proxy


def test_a_copy_in_the_cache_is_used_without_network(offline):
    reference = torchvision.models.resnet18(weights=None)
    offline.mkdir(parents=True)
    torch.save(reference.state_dict(), offline / weights_file_name(RESNET18))
    backbone = ResNetBackbone("resnet18", pretrained="IMAGENET1K_V1")
    torch.testing.assert_close(backbone.body.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(backbone.body.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert backbone.norm == "frozen_bn" and not backbone.body.conv1.weight.requires_grad


def test_a_corrupt_cached_file_is_named_with_what_to_do(offline):
    offline.mkdir(parents=True)
    (offline / weights_file_name(RESNET18)).write_bytes(b"half a download")
    with pytest.raises(WeightsUnavailableError, match=r"the cached file .*resnet18-f37072fd\.pth is unusable .*"
                                                      r"delete it to download it again, or pass a local copy"):
        ResNetBackbone("resnet18", pretrained="DEFAULT")


def test_unknown_tag_lists_the_choices():
    with pytest.raises(ConfigError, match=r"--pretrained-backbone IMAGENET9K: neither a file nor ImageNet weights "
                                          r"of resnet18 \(ResNet18_Weights: DEFAULT, IMAGENET1K_V1\)"):
        ResNetBackbone("resnet18", pretrained="IMAGENET9K")


def test_detection_weights_unavailable_say_weights_path(offline):
    with pytest.raises(WeightsUnavailableError, match=r"detection weights \(RetinaNet_ResNet50_FPN_V2_Weights\.COCO_V1"
                                                      r"\) are not in the cache.*--weights PATH") as error:
        read_weights("retinanet_resnet50_fpn_v2")
    assert isinstance(error.value, CheckpointError) and isinstance(error.value, UserError)


def test_error_file_is_what_torchruns_failure_summary_shows(monkeypatch, tmp_path):
    """torch.distributed.elastic's own reader and formatter show the one line as the worker's cause."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "0")

    def fails():
        raise ConfigError("--lr -1: must be\n > 0")

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(fails)
    assert exit_info.value.code == "error: --lr -1: must be > 0"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    summary = ChildFailedError("train.py", {0: failure}).format_msg()
    assert "traceback : error: --lr -1: must be > 0" in summary
    assert json.loads(error_file.read_text())["message"]["message"] == "error: --lr -1: must be > 0"


def test_other_ranks_exit_quietly_after_giving_rank_0_time(monkeypatch, tmp_path):
    import utils.runtime.errors
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    monkeypatch.setenv("RANK", "1")
    slept = []
    monkeypatch.setattr(utils.runtime.errors.time, "sleep", slept.append)
    def fails():
        raise UserError("bad")

    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(fails)
    assert exit_info.value.code == 1 and slept == [utils.runtime.errors.OTHER_RANKS_EXIT_DELAY_S]
    with pytest.raises(ZeroDivisionError):  # a bug of ours keeps its traceback
        exit_on_user_error(lambda: 1 / 0)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """(tiny dataset, environment of a machine without internet and with an empty hub cache)."""
    root = tmp_path_factory.mktemp("offline")
    generate_demo_dataset(root / "data", num_train=12, num_val=4, image_size=64, seed=4, show_progress=False)
    env = {**os.environ, **NO_NETWORK, "TORCH_HOME": str(root / "torch_home"), "OMP_NUM_THREADS": "1"}
    return str(root / "data"), env, root


def start(cmd, env):
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def error_lines(output: str) -> list:
    return [line for line in output.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_train_py_offline_single_process_and_torchrun(offline_run):
    data, env, root = offline_run
    common = ["--data-path", data, "--train-split", "train", "--val-split", "val", "--device", "cpu"]
    # Started together: each is mostly interpreter start-up and torch's import.
    runs = {
        "backbone": start([sys.executable, "train.py", *common, "--output-dir", str(root / "a")], env),
        "weights": start([sys.executable, "train.py", *common, "--output-dir", str(root / "b"),
                          "--weights", "RetinaNet_ResNet50_FPN_Weights.COCO_V1", "--min-size", "64"], env),
    }
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in runs.items()}
    for name, proc in runs.items():
        assert proc.returncode == 1 and "Traceback" not in outputs[name], outputs[name][-3000:]
        assert len(error_lines(outputs[name])) == 1, outputs[name][-3000:]
    backbone_line, = error_lines(outputs["backbone"])
    assert "resnet50-11ad3fa6.pth" in backbone_line and str(root / "torch_home" / "hub" / "checkpoints") in backbone_line
    assert "--pretrained-backbone PATH" in backbone_line and "--pretrained-backbone none" in backbone_line
    weights_line, = error_lines(outputs["weights"])
    assert "retinanet_resnet50_fpn_coco-eeacb38b.pth" in weights_line and "--weights PATH" in weights_line
    assert not os.path.exists(root / "a" / "log.jsonl")  # stopped before any training

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",  # a free port
           "train.py", *common, "--output-dir", str(root / "c"), *TINY_MODEL[:2], "--pretrained-backbone", "DEFAULT"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    line, = error_lines(output)  # printed once, by rank 0
    assert "resnet18-f37072fd.pth" in line and "--pretrained-backbone none" in line
    # The workers print no traceback. torchrun's launcher ends with its own report (a Python
    # traceback of ChildFailedError, which no worker can suppress); its root cause is our line.
    assert "[rank0]" not in output and "[rank1]" not in output
    assert output.count("Traceback") == 1 and "ChildFailedError" in output.split("Traceback", 1)[1]
    assert f"traceback : {line}" in output.split("Root Cause", 1)[1]
