"""benchmarks/gpu_check.py works before a GPU is at hand: the whole run at toy size on CPU, its time
caps, and the out-of-memory fallback of the speed part."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_measure  # noqa: E402

CHECKS = {"eval_detections", "train_losses_fp32", "focal_loss", "channels_last", "amp_training", "host_sync", "compile"}


def test_smoke_run_on_cpu_writes_every_section(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                             "--output-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) == {"meta", "correctness", "speed", "data", "learning", "summary"}
    assert report["summary"]["ok"] and report["meta"]["smoke"] and report["meta"]["device"] == "cpu"
    for part in gpu_check.PARTS:
        assert report[part]["status"] in ("passed", "partial", "measured"), (part, report[part])
        assert "skipped" in report[part] and report[part]["wall_s"] <= report[part]["cap_s"] + 5
    # Without CUDA the script says what it could not check.
    for part in ("correctness", "speed"):
        assert "no CUDA device" in report[part]["skipped"]["cuda"]
    assert "set_sync_debug_mode" in report["correctness"]["skipped"]["host_sync.cuda_sync_debug"]
    assert {"train_fp16", "eval_fp16"} <= set(report["speed"]["skipped"])

    checks = report["correctness"]["checks"]
    assert set(checks) == CHECKS and all(check["passed"] for check in checks.values())
    assert checks["eval_detections"]["counts"][0][0] > 0
    assert set(checks["amp_training"]) >= {"fp32", "fp16", "bf16"}
    assert checks["host_sync"]["fp32"]["reads"]["unexpected"] == 0
    speed = report["speed"]["results"]
    assert speed["train_bf16"]["ours_images_per_s"] > 0 and speed["eval_fp32"]["ratio"] > 0
    assert [r["workers"] for r in report["data"]["results"].values()] == [0, 1]
    assert report["data"]["model_train_images_per_s"]["setting"] == "train_bf16" and report["data"]["verdict"]
    learning = report["learning"]
    assert learning["train_exit_code"] == 0 and learning["iterations"] == 2
    assert learning["metrics"]["AP"] is not None and "AMP check passed" in learning["amp_check"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## 2. Speed" in markdown and "| train_bf16 | 2 |" in markdown


def test_a_part_past_its_cap_is_cut_off_and_says_so(tmp_path):
    threads = torch.get_num_threads()
    try:
        args = gpu_check.get_args_parser().parse_args(["--device", "cpu", "--smoke", "--parts", "data", "--data-cap",
                                                       "0.3", "--output-dir", str(tmp_path)])
        assert gpu_check.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["data"]["status"] == "partial" and report["data"]["skipped"]
    assert all(report[part]["status"] == "skipped" for part in ("correctness", "speed", "learning"))
    assert report["speed"]["skipped"]["part"] == "not in --parts"


def test_speed_halves_the_batch_when_memory_runs_out(monkeypatch):
    batches = []

    def fake_benchmark(args):
        batches.append(args.batch_size)
        if args.batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        side = {"train_images_per_s": 10.0 * args.batch_size, "train_peak_bytes": 2 ** 30,
                "train_images_per_s_all": [10.0]}
        return {"ours": side, "torchvision": dict(side, train_images_per_s=5.0 * args.batch_size),
                "train_images_per_s_ratio": 2.0}

    monkeypatch.setattr(gpu_measure.benchmark, "main", fake_benchmark)
    context = gpu_measure.Context(device=torch.device("cpu"), smoke=True, sizes=gpu_measure.SMOKE,
                                  correctness_sizes=None, work_dir=Path("."), data_path=None, data_split="train",
                                  demo_data="")
    result = gpu_measure._benchmark_with_oom_retry(context, "bf16", "train", 16)
    assert batches == [16, 8, 4]
    assert result["batch_size"] == 4 and result["requested_batch_size"] == 16
    assert "out of memory at batch 16; out of memory at batch 8, ran at batch 4" == result["lowered"]
    assert result["ours_images_per_s"] == 40.0 and result["ours_peak_mib"] == 1024
    monkeypatch.setattr(gpu_measure.benchmark, "main", lambda args: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="even at batch 1"):
        gpu_measure._benchmark_with_oom_retry(context, "bf16", "train", 2)
