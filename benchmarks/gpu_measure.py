"""The four parts of benchmarks/gpu_check.py: what each runs, at which size, within which budget.

Every part is ``run_<part>(context, section, budget, report)``: it fills ``section`` (its JSON
section: ``checks`` or measurements, and ``skipped``: {what: why}) and asks ``budget`` before
each step whether the time left is enough for it.
"""
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark  # noqa: E402
import data_benchmark  # noqa: E402
import gpu_correctness as correctness  # noqa: E402

import coco_dataset  # noqa: E402
from recipes import DEMO_DATASET  # noqa: E402
from utils.data.demo_data import ensure_demo_dataset  # noqa: E402
from utils.data.loaders import build_train_loader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device (--device cpu): ran CPU against CPU at toy size, which tests this script, not CUDA"
CPU_DEMO_REFERENCE = "docs/training.md: demo recipe on 2 CPU cores, AP 0.441 / AP50 0.661 in 10 min 22 s"


@dataclass(frozen=True)
class PartSizes:
    """Sizes of parts 2-4 (part 1's are in gpu_correctness.Sizes)."""
    speed: list                # benchmark.py arguments shared by every speed setting
    train_batch: int
    eval_batch: int
    data_images: dict          # ensure_demo_dataset arguments of part 3's images
    data_workers: tuple
    data_batch: int
    data_batches: int
    learning_data: dict        # ensure_demo_dataset arguments of part 4's dataset
    learning_args: list        # train.py arguments beyond data, device and output
    sync_data: dict = field(default_factory=lambda: dict(num_train=10, num_val=0, image_size=64, seed=3))


FULL = PartSizes(
    speed=["--backbone", "resnet50", "--image-size", "800", "1333", "--iters", "5", "--warmup", "2", "--repeats", "3"],
    train_batch=16, eval_batch=8,
    data_images=dict(num_train=256, num_val=0, image_size=(480, 640), seed=0), data_workers=(0, 4, 8),
    data_batch=16, data_batches=24,
    learning_data=dict(DEMO_DATASET),
    learning_args=["--recipe", "demo", "--workers", "4", "--print-freq", "100"])
SMOKE = PartSizes(
    speed=["--backbone", "resnet18", "--image-size", "64", "96", "--num-classes", "5", "--iters", "1", "--warmup", "0",
           "--repeats", "1"],
    train_batch=2, eval_batch=2,
    data_images=dict(num_train=16, num_val=0, image_size=(48, 64), seed=0), data_workers=(0, 1), data_batch=4,
    data_batches=3,
    learning_data=dict(num_train=8, num_val=4, image_size=64, seed=1),
    learning_args=["--recipe", "demo", "--workers", "0", "--batch-size", "4", "--epochs", "1", "--warmup-iters", "1",
                   "--num-threads", "1",
                   "--print-freq", "1", "--backbone", "resnet18", "--fpn-channels", "32", "--head-convs", "1",
                   "--num-extra-levels", "1", "--anchor-base-sizes", "16", "32", "64", "128", "--min-size", "64",
                   "--max-size", "64"])


@dataclass
class Context:
    device: torch.device
    smoke: bool
    sizes: PartSizes
    correctness_sizes: "correctness.Sizes"
    work_dir: Path
    data_path: str
    data_split: str
    demo_data: str
    generator: object = None  # the background data-generation process, if any
    ready: dict = field(default_factory=dict)  # dataset root -> Event set once the background process made it

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class OutOfTime(Exception):
    """Not enough of the part's cap left for the next step."""


class Budget:
    def __init__(self, cap_s: float):
        self.cap_s, self.start = cap_s, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.cap_s - self.elapsed()

    def require(self, seconds: float, what: str) -> None:
        if self.remaining() < seconds:
            raise OutOfTime(f"needs about {seconds:.0f} s, {max(self.remaining(), 0):.0f} s of the part's "
                            f"{self.cap_s:.0f} s cap left")


def generate_datasets(jobs: list, events: list = None) -> None:
    """``[(root, ensure_demo_dataset kwargs)]`` in order, setting ``events[i]`` when job i is done
    (also the background process's target)."""
    for index, (root, kwargs) in enumerate(jobs):
        ensure_demo_dataset(root, show_progress=False, **kwargs)
        if events:
            events[index].set()


def _wait_for_data(context: Context, root: str, kwargs: dict, budget: Budget) -> None:
    """Wait until the background process has made ``root``; make it here if that process is gone."""
    event = context.ready.get(root)
    while event is not None and not event.is_set() and context.generator.is_alive():
        if budget.remaining() < 5:
            raise OutOfTime("the test images are still being generated")
        event.wait(0.5)
    if event is None or not event.is_set():
        ensure_demo_dataset(root, show_progress=False, **kwargs)  # returns at once if it is complete


def run_step(section: dict, name: str, function, budget: Budget, needs_s: float, into: str = "checks"):
    """``section[into][name] = function()`` if ``needs_s`` is left, else a ``skipped`` entry. An
    exception is recorded as ``{"passed": False, "error": ...}`` and the part goes on."""
    start = time.perf_counter()
    try:
        budget.require(needs_s, name)
        print(f"--- {name}", flush=True)
        result = function()
    except OutOfTime as exc:
        section["skipped"][name] = str(exc)
        return None
    except Exception as exc:
        result = {"passed": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                  "traceback": traceback.format_exc()[-2500:]}
        print(result["traceback"], file=sys.stderr, flush=True)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    section.setdefault(into, {})[name] = result
    return result


# ---------------------------------------------------------------- part 1: correctness

def run_correctness(context: Context, section: dict, budget: Budget, report: dict) -> None:
    device, sizes = context.device, context.correctness_sizes
    if not context.cuda:
        section["skipped"]["cuda"] = NO_CUDA
    section["tf32"] = "off: cuDNN and matmul in full fp32 for the comparisons with the CPU"
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        quick = 5 if context.smoke else 20
        run_step(section, "eval_detections", lambda: correctness.check_eval_detections(device, sizes), budget, quick)
        run_step(section, "train_losses_fp32", lambda: correctness.check_train_losses(device, sizes), budget, quick)
        run_step(section, "focal_loss", lambda: correctness.check_focal_loss(device, sizes), budget, 2)
        run_step(section, "channels_last", lambda: correctness.check_channels_last(device, sizes), budget, quick)
        run_step(section, "amp_training", lambda: correctness.check_amp_training(device, sizes), budget, quick)
        run_step(section, "host_sync", lambda: correctness.check_host_sync(device, _sync_batches(context),
                                                                           str(context.work_dir / "sync")),
                 budget, 5 if context.smoke else 15)
        if not context.cuda:
            section["skipped"]["host_sync.cuda_sync_debug"] = "torch.cuda.set_sync_debug_mode needs CUDA; the " \
                                                              "host reads were counted by patching instead"
        # Last: inductor's compilation is the slowest and least predictable step.
        run_step(section, "compile", lambda: correctness.check_compile(device, sizes), budget,
                 5 if context.smoke else 50)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _sync_batches(context: Context) -> list:
    root = str(context.work_dir / "sync_data")
    ensure_demo_dataset(root, show_progress=False, **context.sizes.sync_data)
    dataset = coco_dataset.build_dataset(root, "train", train=True)
    loader = build_train_loader(dataset, 2, 0, seed=0, aspect_ratio_grouping=False, pin_memory=context.cuda)
    loader.batch_sampler.set_epoch(0)
    return list(loader)


# ---------------------------------------------------------------- part 2: speed

# fp16 first: it is what --amp auto picks on CUDA, so the figures that matter most come first.
SPEED_SETTINGS = [("fp16", "train"), ("fp16", "eval"), ("bf16", "train"), ("bf16", "eval"), ("fp32", "eval")]


def run_speed(context: Context, section: dict, budget: Budget, report: dict) -> None:
    sizes = context.sizes
    if not context.cuda:
        section["skipped"]["cuda"] = NO_CUDA
    section["settings"] = ("benchmarks/benchmark.py " + " ".join(sizes.speed) + f" --recipe finetune; training batch "
                           f"{sizes.train_batch}, inference batch {sizes.eval_batch}, halved on out-of-memory")
    section["results"] = {}
    estimates = {"train": 3 if context.smoke else 30, "eval": 3 if context.smoke else 15}  # s, until measured
    for amp, phase in SPEED_SETTINGS:
        name = f"{phase}_{amp}"
        if amp == "fp16" and not context.cuda:
            section["skipped"][name] = "fp16 autocast is for CUDA (benchmark.py runs bf16 on CPU)"
            continue
        if amp == "bf16" and context.cuda and not torch.cuda.is_bf16_supported():
            section["skipped"][name] = "this GPU has no bf16"
            continue
        batch = sizes.train_batch if phase == "train" else sizes.eval_batch
        result = run_step(section, name, lambda: _benchmark_with_oom_retry(context, amp, phase, batch), budget,
                          estimates[phase], into="results")
        if result and result.get("wall_s"):
            estimates[phase] = max(estimates[phase], result["wall_s"] * 1.2)
        gc.collect()  # the next setting starts from an empty allocator
        if context.cuda:
            torch.cuda.empty_cache()


def _benchmark_with_oom_retry(context: Context, amp: str, phase: str, batch: int) -> dict:
    requested, notes = batch, []
    while True:
        args = benchmark.get_args_parser().parse_args(
            context.sizes.speed + ["--device", str(context.device), "--amp", "none" if amp == "fp32" else amp,
                                   "--batch-size", str(batch), "--eval-batch-size", str(batch),
                                   "--skip-eval" if phase == "train" else "--skip-train"])
        out_of_memory = False
        try:
            report = benchmark.main(args)
        except torch.OutOfMemoryError:
            out_of_memory = True  # leave the except block first: its traceback holds the tensors
        if not out_of_memory:
            break
        gc.collect()
        if context.cuda:
            torch.cuda.empty_cache()
        if batch == 1:
            raise RuntimeError(f"out of memory even at batch 1 ({phase}, {amp})")
        notes.append(f"out of memory at batch {batch}")
        batch //= 2
    key = "train" if phase == "train" else "eval"
    ours, theirs = report["ours"], report["torchvision"]
    mib = 2 ** 20
    return {"amp": amp, "phase": phase, "batch_size": batch, "requested_batch_size": requested,
            "lowered": "; ".join(notes) + f", ran at batch {batch}" if notes else None,
            "ours_images_per_s": ours[f"{key}_images_per_s"], "torchvision_images_per_s": theirs[f"{key}_images_per_s"],
            "ratio": report[f"{key}_images_per_s_ratio"],
            "ours_peak_mib": ours[f"{key}_peak_bytes"] / mib if ours[f"{key}_peak_bytes"] else None,
            "torchvision_peak_mib": theirs[f"{key}_peak_bytes"] / mib if theirs[f"{key}_peak_bytes"] else None,
            "ours_all": ours[f"{key}_images_per_s_all"], "torchvision_all": theirs[f"{key}_images_per_s_all"]}


# ---------------------------------------------------------------- part 3: data loading

def run_data(context: Context, section: dict, budget: Budget, report: dict) -> None:
    sizes = context.sizes
    if context.data_path:
        root, split = context.data_path, context.data_split
    else:
        root, split = str(context.work_dir / "jpeg_640x480"), "train"
        _wait_for_data(context, root, sizes.data_images, budget)
    dataset = coco_dataset.build_dataset(root, split, train=True)
    args = data_benchmark.get_args_parser().parse_args(
        ["--data-path", root, "--split", split, "--batch-size", str(sizes.data_batch),
         "--batches", str(sizes.data_batches)] + (["--pin-memory"] if context.cuda else []))
    section.update(data=f"{root} [{split}]: {len(dataset)} images", batch_size=sizes.data_batch,
                   pin_memory=context.cuda, cpus=os.cpu_count(), results={})
    for workers in sizes.data_workers:
        if workers > (os.cpu_count() or 1):
            section["skipped"][f"workers_{workers}"] = f"only {os.cpu_count()} CPUs"
            continue
        run_step(section, f"workers_{workers}", lambda: data_benchmark.time_loader(dataset, args, workers), budget,
                 2 if context.smoke else 8, into="results")
    consumed = _model_training_images_per_s(report)
    if consumed is None:
        section["skipped"]["comparison"] = "no training images/s from part 2"
        return
    section["model_train_images_per_s"] = consumed
    best = max(section["results"].values(), key=lambda r: r.get("images_per_s", 0), default=None)
    for result in section["results"].values():
        if "images_per_s" in result:
            result["loader_over_model"] = result["images_per_s"] / consumed["images_per_s"]
    if best and "images_per_s" in best:
        waits = best["images_per_s"] < consumed["images_per_s"]
        section["verdict"] = (f"The GPU would wait for data: the best loader ({best['workers']} workers) delivers "
                              f"{best['images_per_s']:.0f} images/s, the model trains on {consumed['images_per_s']:.0f}"
                              if waits else
                              f"The loader keeps up: {best['images_per_s']:.0f} images/s with {best['workers']} workers "
                              f"against {consumed['images_per_s']:.0f} trained")


def _model_training_images_per_s(report: dict):
    results = report.get("speed", {}).get("results", {})
    for name in ("train_fp16", "train_bf16"):
        if results.get(name, {}).get("ours_images_per_s"):
            return {"setting": name, "images_per_s": results[name]["ours_images_per_s"]}
    return None


# ---------------------------------------------------------------- part 4: learning

def run_learning(context: Context, section: dict, budget: Budget, report: dict) -> None:
    _wait_for_data(context, context.demo_data, context.sizes.learning_data, budget)
    output = context.work_dir / "learning"
    amp = "fp16" if context.cuda else "bf16"  # what --amp auto picks; also runs train.py's AMP self-check
    command = [sys.executable, str(REPO / "train.py"), "--data-path", context.demo_data, "--train-split", "train",
               "--val-split", "val", "--device", str(context.device), "--amp", amp, "--output-dir", str(output),
               *context.sizes.learning_args]
    section.update(command=" ".join(command[1:]), reference=CPU_DEMO_REFERENCE)
    eval_reserve = 15 if context.smoke else 30
    start = time.perf_counter()
    shutil.rmtree(output, ignore_errors=True)  # an earlier run's checkpoints and log must not count
    output.mkdir(parents=True)
    with open(output / "stdout.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=max(budget.remaining() - eval_reserve, 1))
        except subprocess.TimeoutExpired:  # SIGTERM: train.py checkpoints and exits cleanly
            section["skipped"]["full schedule"] = "stopped by the time cap (SIGTERM, checkpoint written)"
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=eval_reserve / 2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    section["train_wall_s"] = round(time.perf_counter() - start, 1)
    section["train_exit_code"] = process.returncode
    text = (output / "stdout.log").read_text(errors="replace")
    section["amp_check"] = next((line.split(": ", 1)[-1] for line in text.splitlines() if "AMP check" in line), None)
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if line.strip()] \
        if (output / "log.jsonl").is_file() else []
    train_records = [r for r in records if r.get("type") == "train"]
    if train_records:
        section["iterations"] = train_records[-1]["iteration"]
        section["last_train_record"] = train_records[-1]
        speeds = [r["images_per_s"] for r in train_records[1:]] or [train_records[-1]["images_per_s"]]
        section["train_images_per_s_median"] = sorted(speeds)[len(speeds) // 2]
    metrics_file = output / "eval_val" / "metrics.json"
    if not metrics_file.is_file():
        metrics_file = _evaluate_last_checkpoint(context, output, budget, section)
    if metrics_file is None or not metrics_file.is_file():
        raise RuntimeError(f"no evaluation (train.py exit code {process.returncode}); see {output / 'stdout.log'}:\n"
                           + "\n".join(text.splitlines()[-15:]))
    metrics = json.loads(metrics_file.read_text())
    section["metrics"] = {k: metrics.get(k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def _evaluate_last_checkpoint(context: Context, output: Path, budget: Budget, section: dict):
    checkpoints = sorted(output.glob("checkpoint*.pth"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        return None
    eval_dir = output / "eval_checkpoint"
    command = [sys.executable, str(REPO / "evaluation.py"), "--checkpoint", str(checkpoints[-1]), "--data-path",
               context.demo_data, "--split", "val", "--device", str(context.device), "--output-dir", str(eval_dir),
               "--workers", "0"]
    section["evaluated_checkpoint"] = str(checkpoints[-1])
    subprocess.run(command, cwd=REPO, capture_output=True, timeout=max(budget.remaining() - 2, 1))
    return eval_dir / "metrics.json"
