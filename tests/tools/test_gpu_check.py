"""benchmarks/gpu_check.py works before a GPU is at hand: the whole run at toy size on CPU (what it
writes, value by value), its time caps, and the out-of-memory fallback of the speed part. Nothing here
depends on the machine's speed: the smoke run gets caps no machine reaches, the cut-off a part that
cannot finish."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_measure  # noqa: E402

CHECKS = {"eval_detections", "train_losses_fp32", "focal_loss", "channels_last", "amp_training", "host_sync", "compile"}


@pytest.mark.slow
def test_smoke_run_on_cpu_writes_every_section(tmp_path):
    # Caps far above any machine's need: what the run reports must not depend on how fast this one is.
    caps = [arg for part in gpu_check.PARTS for arg in (f"--{part}-cap", "3600")]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke",
                             "--output-dir", str(tmp_path), *caps], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) == {"meta", "correctness", "speed", "data", "learning", "summary"}
    assert report["summary"]["ok"] and report["meta"]["smoke"] and report["meta"]["device"] == "cpu"
    for part in gpu_check.PARTS:
        assert report[part]["status"] in ("passed", "partial", "measured"), (part, report[part])
        assert report[part]["cap_s"] == 3600 and "rest of the part" not in report[part]["skipped"]
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
    markdown = (tmp_path / "gpu_check.md").read_text()
    speed = report["speed"]["results"]
    assert set(speed) == {"train_bf16", "eval_bf16", "eval_fp32"}
    for name, row in speed.items():
        phase, amp = name.split("_")
        batch = gpu_measure.SMOKE.train_batch if phase == "train" else gpu_measure.SMOKE.eval_batch
        assert (row["phase"], row["amp"], row["batch_size"], row["requested_batch_size"], row["lowered"]) == (
            phase, amp, batch, batch, None)
        assert row["ours_images_per_s"] > 0 and row["ours_peak_mib"] > 0 and row["torchvision_peak_mib"] > 0
        assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["torchvision_images_per_s"])
        assert (f"| {name} | {batch} | {row['ours_images_per_s']:.1f} | {row['torchvision_images_per_s']:.1f} | "
                f"{row['ratio']:.2f}x | {row['ours_peak_mib']:.0f} | {row['torchvision_peak_mib']:.0f} |") in markdown
    data = report["data"]
    assert data["model_train_images_per_s"] == {"setting": "train_bf16",
                                                "images_per_s": speed["train_bf16"]["ours_images_per_s"]}
    assert [row["workers"] for row in data["results"].values()] == [0, 1] and data["verdict"] in markdown
    for row in data["results"].values():
        assert row["batches"] == gpu_measure.SMOKE.data_batches and row["images_per_s"] > 0
        assert row["loader_over_model"] == pytest.approx(row["images_per_s"] / speed["train_bf16"]["ours_images_per_s"])
        assert f"| {row['workers']} | {row['images_per_s']:.1f} | {row['median_batch_ms']:.1f} |" in markdown
    learning = report["learning"]
    assert learning["train_exit_code"] == 0 and learning["iterations"] == 2  # 8 demo images at batch 4
    assert learning["metrics"]["AP"] is not None and "AMP check passed" in learning["amp_check"]
    assert (f"| 2 | {learning['train_wall_s']:.1f} | {learning['train_images_per_s_median']:.1f} | "
            f"{learning['metrics']['AP']:.3f} | {learning['metrics']['AP50']:.3f} |") in markdown
    assert "## 2. Speed" in markdown and "**Result: all checks passed**" in markdown


def test_a_part_past_its_cap_is_cut_off_and_says_so(tmp_path, monkeypatch):
    """A part that cannot end on its own (it waits far past its 0.3 s cap) is stopped by the cap on any
    machine; what it measured before is kept, and the parts not asked for say so."""
    def data_part_that_never_ends(context, section, budget, report):
        section["results"] = {"workers_0": {"workers": 0, "images_per_s": 123.0}}
        time.sleep(30)  # only a cap that does not work lets it return (and the test fail)

    monkeypatch.setattr(gpu_measure, "run_data", data_part_that_never_ends)
    threads = torch.get_num_threads()
    try:
        args = gpu_check.get_args_parser().parse_args(["--device", "cpu", "--smoke", "--parts", "data", "--data-cap",
                                                       "0.3", "--output-dir", str(tmp_path)])
        assert gpu_check.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["data"]["status"] == "partial" and report["data"]["cap_s"] == 0.3
    assert report["data"]["skipped"] == {"rest of the part": "stopped by the time cap (0 s)"}
    assert report["data"]["results"] == {"workers_0": {"workers": 0, "images_per_s": 123.0}}
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
