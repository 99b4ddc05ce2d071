"""Where ONNX Runtime spends an exported detector's time, by operator type (float or INT8 file).

    python benchmarks/onnx_profile.py --onnx model.onnx model_int8.onnx --threads 2
    python benchmarks/onnx_profile.py --threads 2 --output benchmarks/results/onnx_profile_r50_512.json
        # no --onnx: the random-weight R-50 export of onnx_benchmark.py, float and INT8

ONNX Runtime's own profiler records every node's run time; this sums them by operator type over
``--runs`` calls on one synthetic uint8 image (after ``--warmup`` untimed calls) and prints each
type's share of the model's time: which part of the graph an INT8 conversion can speed up (the
convolutions) and which it leaves as it was (resize, decoding, top-k, NMS run in float).
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import build_ours  # noqa: E402
from deploy.ort_detector import INPUT_NAME, OUTPUT_NAMES  # noqa: E402
from onnx_benchmark import export_float, quantize_on_scenes  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("ONNX Runtime time by operator type",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--onnx", nargs="+", help="exported files to profile (default: a random-weight R-50 "
                        "export, float and INT8, as benchmarks/onnx_benchmark.py builds them)")
    parser.add_argument("--backbone", default="resnet50", help="trunk of the default export")
    parser.add_argument("--num-classes", type=int, default=80, help="classes of the default export")
    parser.add_argument("--image-size", type=int, nargs="+", default=[512], help="H [W] of the synthetic image")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--runs", type=int, default=5, help="profiled calls per file")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before them")
    parser.add_argument("--output", help="write the shares as JSON here")
    return parser


def profile_file(path: str, image: np.ndarray, threads, runs: int, warmup: int) -> dict:
    """``{"ms_per_call", "by_op": {op_type: {"ms_per_call", "share"}}}`` for one ONNX file."""
    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})
        # A second session profiles, so the warm-up calls stay out of the record.
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})  # the new session's first call: untimed
        start = time.perf_counter()
        for _ in range(runs):
            session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})
        wall_ms = (time.perf_counter() - start) * 1000 / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    calls = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed_from = calls[1]["ts"] if len(calls) > 1 else 0  # skip the untimed first call's nodes
    by_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed_from:
            by_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    total = sum(by_op.values())
    return {"ms_per_call": wall_ms, "node_ms_per_call": total,
            "by_op": {op: {"ms_per_call": ms, "share": ms / total} for op, ms in by_op.most_common()}}


def default_exports(args, folder: str) -> list:
    """The random-weight export of ``onnx_benchmark.py`` and its INT8 version (calibrated on 8 scenes)."""
    args.image_size = [args.size[0], args.size[1]]
    args.recipe, args.size_divisible, args.detections_per_img = "finetune", 32, 100
    torch.manual_seed(0)
    model = build_ours(args).eval()
    float_path, int8_path = os.path.join(folder, "model.onnx"), os.path.join(folder, "model_int8.onnx")
    export_float(model, float_path, args.num_classes)
    quantize_on_scenes(float_path, int8_path, args.size, count=8)
    return [float_path, int8_path]


def main(args) -> dict:
    args.size = (args.image_size[0], args.image_size[-1])
    image = np.random.default_rng(0).integers(0, 256, (3, *args.size), dtype=np.uint8)
    report = {"image_size": list(args.size), "threads": args.threads, "runs": args.runs,
              "onnxruntime_version": onnxruntime.__version__, "files": {}}
    with tempfile.TemporaryDirectory() as folder:
        paths = args.onnx or default_exports(args, folder)
        for path in paths:
            name = Path(path).name
            result = profile_file(path, image, args.threads, args.runs, args.warmup)
            report["files"][name] = result
            print(f"\n{name}: {result['ms_per_call']:.1f} ms per call ({result['node_ms_per_call']:.1f} ms in nodes)")
            for op, figures in result["by_op"].items():
                if figures["share"] >= 0.005:
                    print(f"  {op:28s} {figures['ms_per_call']:8.1f} ms  {100 * figures['share']:5.1f} %")
    if args.output:
        write_json_atomic(args.output, report)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
