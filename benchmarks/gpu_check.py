"""Check and measure the GPU path in one run of at most 8 minutes (H100 / H200).

    python benchmarks/gpu_check.py --output-dir benchmarks/results          # on one CUDA device
    python benchmarks/gpu_check.py --device cpu --smoke --output-dir /tmp/gc # toy sizes, < 1 min (the tests)
    python benchmarks/gpu_check.py --parts speed data                       # rerun some parts only

Four parts, each under its own time cap; what a part could not run within its cap (or
without CUDA) is listed under its ``skipped`` with the reason:

1. correctness (benchmarks/gpu_correctness.py): the same weights on the device and on the
   CPU give the same detections (count, scores within 1e-3, boxes within 0.5 px) and the same
   fp32 training losses; 30 AMP steps (fp16 with GradScaler, bf16) stay finite and near the fp32
   curve; channels_last and ``compile_parts()`` match eager; the fused focal loss matches
   ``torchvision.ops.sigmoid_focal_loss``; the training step reads back only what engine.py allows.
2. speed: ours against torchvision through ``benchmarks/benchmark.py`` (R-50, 800 x 1333, AMP
   fp16 and bf16, training batch 16 and inference batch 8, halved on out-of-memory; fp32 inference).
3. data: the training loader's images/s with 0 / 4 / 8 workers on 640 x 480 JPEGs (generated unless
   ``--data-path``, through ``benchmarks/data_benchmark.py``) against part 2's training images/s.
4. learning: ``train.py`` on the demo recipe (AMP on CUDA), then AP on the demo val split.

Writes ``gpu_check.json`` (after every part, so a cut-off run keeps what it measured) and
``gpu_check.md`` into ``--output-dir``; large working files go to ``--work-dir`` (output/gpu_check). Exits 1 if a
check failed or a part raised.
"""
import argparse
import contextlib
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_correctness as correctness  # noqa: E402
import gpu_measure as measure  # noqa: E402
from gpu_report import render_markdown  # noqa: E402
from utils.runtime.atomic_io import atomic_write, write_json_atomic  # noqa: E402
from utils.runtime.device import resolve_device  # noqa: E402
from utils.runtime.errors import UserError, exit_on_user_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("correctness", "speed", "data", "learning")
# Seconds per part: 455 s in all, leaving half a minute of the 8 for start-up and the report.
DEFAULT_CAPS = {"correctness": 140, "speed": 120, "data": 45, "learning": 150}
SMOKE_CAPS = {"correctness": 40, "speed": 30, "data": 20, "learning": 60}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RetinaNet GPU check: correctness, speed, data loading and learning on one "
                                     "device", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --smoke: test the script)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes everywhere: the whole run in under a minute")
    parser.add_argument("--output-dir", default="benchmarks/results", help="gpu_check.json and gpu_check.md go here")
    parser.add_argument("--work-dir", default=None,
                        help="generated images and the training run (default: output/gpu_check in the repository, "
                             "which git ignores; with --smoke OUTPUT_DIR/gpu_check_work)")
    parser.add_argument("--demo-data", default="data/demo",
                        help="the demo dataset for part 4 (generated there if missing; train.py's default)")
    parser.add_argument("--data-path", default=None, help="part 3 on this COCO-format root instead of generated JPEGs")
    parser.add_argument("--data-split", default="train2017", help="split of --data-path")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    for part in PARTS:
        parser.add_argument(f"--{part}-cap", type=float, default=None,
                            help=f"time cap of part '{part}' in s (default: {DEFAULT_CAPS[part]}, "
                                 f"{SMOKE_CAPS[part]} with --smoke)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --smoke)")
    return parser


class PartTimeout(BaseException):
    """A part ran past its hard cap (BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Interrupt the block after ``seconds`` (SIGALRM; main thread of a Unix process only)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"stopped by the time cap ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _meta(args, device) -> dict:
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": str(device), "smoke": args.smoke,
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_commit": _git_commit()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return meta


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Report:
    """The JSON being built; written (with its markdown) after every part."""

    def __init__(self, output_dir: Path, meta: dict):
        self.output_dir, self.start = output_dir, time.perf_counter()
        self.data = {"meta": meta, **{part: {"status": "not run", "skipped": {}} for part in PARTS}}

    def write(self) -> None:
        self.data["meta"]["wall_s"] = round(time.perf_counter() - self.start, 1)
        failed = [f"{part}.{name}" for part in PARTS for key in ("checks", "results")
                  for name, entry in self.data[part].get(key, {}).items() if not entry.get("passed", True)]
        errors = [part for part in PARTS if self.data[part]["status"] == "error"]
        self.data["summary"] = {"failed_checks": failed, "parts_with_errors": errors,
                                "ok": not failed and not errors}
        write_json_atomic(self.output_dir / "gpu_check.json", self.data)
        markdown = render_markdown(self.data)
        atomic_write(self.output_dir / "gpu_check.md", lambda f: f.write(markdown), binary=False)


def run_part(report: Report, part: str, function, cap: float) -> None:
    section = report.data[part] = {"status": "running", "cap_s": cap, "skipped": {}}
    budget = measure.Budget(cap)
    print(f"\n=== part '{part}' (cap {cap:.0f} s) ===", flush=True)
    try:
        with hard_limit(cap):
            function(section, budget)
        section["status"] = _status(section)
    except PartTimeout as exc:
        section["skipped"]["rest of the part"] = str(exc)
        section["status"] = "partial"
    except Exception as exc:  # record and go on: one GPU window must not lose the other parts
        section["status"], section["error"] = "error", f"{type(exc).__name__}: {exc}"
        section["traceback"] = traceback.format_exc()[-4000:]
        print(section["traceback"], file=sys.stderr, flush=True)
    section["wall_s"] = round(budget.elapsed(), 1)
    report.write()


def _status(section: dict) -> str:
    checks = section.get("checks", {})
    if any(not entry.get("passed", True) for key in ("checks", "results") for entry in section.get(key, {}).values()):
        return "failed"
    if section["skipped"]:
        return "partial"
    return "passed" if checks else "measured"


def _start_data_generation(args, work_dir: Path, demo_root: str, sizes: "measure.PartSizes"):
    """Part 3's JPEGs and part 4's demo dataset, generated by a background process while parts 1-2 use
    the GPU (with --smoke, inline: tiny, and a process start costs more)."""
    jobs = []
    if "data" in args.parts and not args.data_path:
        jobs.append((str(work_dir / "jpeg_640x480"), sizes.data_images))
    if "learning" in args.parts:
        jobs.append((demo_root, sizes.learning_data))
    if args.smoke or not jobs:
        measure.generate_datasets(jobs)
        return None, {}
    spawn = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
    events = [spawn.Event() for _ in jobs]
    process = spawn.Process(target=measure.generate_datasets, args=(jobs, events), daemon=True)
    process.start()
    return process, {root: event for (root, _), event in zip(jobs, events)}


def main(args) -> int:
    if args.threads or args.smoke:  # smoke: one thread, which suffers least on a shared machine
        torch.set_num_threads(args.threads or 1)
    device = resolve_device(args.device)
    if args.data_path and "data" in args.parts:
        annotations = Path(args.data_path) / "annotations" / f"instances_{args.data_split}.json"
        if not annotations.is_file():
            raise UserError(f"--data-path {args.data_path} --data-split {args.data_split}: no {annotations}")
    output_dir = Path(args.output_dir).resolve()
    default_work_dir = output_dir / "gpu_check_work" if args.smoke else REPO / "output" / "gpu_check"
    work_dir = Path(args.work_dir or default_work_dir).resolve()
    demo_root = str(work_dir / "learning_data") if args.smoke else str(Path(args.demo_data).resolve())
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    sizes = measure.SMOKE if args.smoke else measure.FULL
    context = measure.Context(device=device, smoke=args.smoke, sizes=sizes,
                              correctness_sizes=correctness.SMOKE if args.smoke else correctness.FULL,
                              work_dir=work_dir, data_path=args.data_path, data_split=args.data_split,
                              demo_data=demo_root)
    context.generator, context.ready = _start_data_generation(args, work_dir, demo_root, sizes)
    report = Report(output_dir, _meta(args, device))
    caps = {part: getattr(args, f"{part}_cap") or (SMOKE_CAPS if args.smoke else DEFAULT_CAPS)[part]
            for part in PARTS}
    functions = {"correctness": measure.run_correctness, "speed": measure.run_speed,
                 "data": measure.run_data, "learning": measure.run_learning}
    for part in PARTS:
        if part in args.parts:
            run_part(report, part, lambda section, budget, f=functions[part]: f(context, section, budget, report.data),
                     caps[part])
        else:
            report.data[part]["skipped"]["part"] = "not in --parts"
            report.data[part]["status"] = "skipped"
    if context.generator is not None and context.generator.is_alive():
        context.generator.terminate()
    report.write()
    print(f"\n{render_markdown(report.data)}\nwrote {output_dir / 'gpu_check.json'} and {output_dir / 'gpu_check.md'} "
          f"in {report.data['meta']['wall_s']:.0f} s", flush=True)
    return 0 if report.data["summary"]["ok"] else 1


if __name__ == "__main__":
    exit_on_user_error(lambda: sys.exit(main(get_args_parser().parse_args())))
