"""ONNX Runtime (float and INT8) on CPU against our PyTorch eager model and torchvision's, in one alternating run.

    python benchmarks/onnx_benchmark.py --threads 2 --output onnx_bench.json   # R-50, 512 px, both conditions
    python benchmarks/onnx_benchmark.py --threads 2 --conditions fresh --fresh-batch-size 1   # inference-only
    python benchmarks/onnx_benchmark.py --image-size 800 1333 --iters 2 --repeats 5

Our model is exported by ``deploy.onnx_export`` (as export.py does, free input size) and
run by ``deploy.ort_detector.OnnxDetector`` (as ``inference.py --onnx`` does, one image
per call); the INT8 row is that export quantized by ``deploy.quantize`` as ``export.py --int8``
does (calibrated on --calibration-count synthetic scenes: the weights are random, so only the
speed means something; --no-int8 leaves it out); our eager model runs as inference.py runs it
(``optimize_for``); torchvision's
RetinaNet is built as in benchmarks/benchmark.py. All three get the same images
(``--image-size H W``, with ``min_size``/``max_size`` set to the short/long side so nobody
resizes), class count, padding multiple, post-processing settings and thread count
(``--threads``: torch's threads and ONNX Runtime's intra-op threads). The timed step is
the whole detector on ``batch`` images, pre- and post-processing included.

Two conditions, both in one run (``--conditions``), because they give different figures
(benchmarks/README.md):

- ``fresh``: a process that only runs inference, first, at ``--fresh-batch-size`` (4), as
  ``inference.py`` and ``benchmarks/benchmark.py`` measure it;
- ``training``: a process that alternates training steps and inference at
  ``--train-batch-size`` (2), as ``train.py`` does when it evaluates: at the start of
  every round both PyTorch models take one training step (SGD, tiny learning rate).

In each condition the three are timed in alternation, one block of ``--iters`` steps
each per round, the order rotated every round; the table shows the median of
``--repeats`` rounds, so background load hits all three alike.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmark import build_ours, build_torchvision_retinanet, make_batch  # noqa: E402
from deploy.onnx_export import export_onnx  # noqa: E402
from deploy.ort_detector import OnnxDetector  # noqa: E402
from deploy.quantize import quantize_int8  # noqa: E402
from deploy.verify import verification_images  # noqa: E402
from model import BACKBONES  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402

NAMES = ("onnxruntime_int8", "onnxruntime", "ours", "torchvision")
RATIOS = (("onnxruntime_int8", "onnxruntime"), ("onnxruntime_int8", "torchvision"), ("onnxruntime", "ours"),
          ("onnxruntime", "torchvision"), ("ours", "torchvision"))


def export_float(model, path: str, num_classes: int) -> None:
    """``model`` as one ONNX file, as export.py writes it (free input size, numbered class names)."""
    export_onnx(model, path, [{"id": k, "name": f"class_{k}"} for k in range(num_classes)], source="benchmark")


def quantize_on_scenes(float_path: str, int8_path: str, size: tuple, count: int) -> None:
    """The INT8 version of ``float_path`` as ``export.py --int8`` makes it, calibrated on ``count``
    synthetic scenes of ``size`` (random weights: only its speed means something)."""
    quantize_int8(float_path, int8_path, [image for _, image in verification_images(count, size)])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RetinaNet CPU inference: ONNX Runtime vs PyTorch eager vs torchvision",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES))
    parser.add_argument("--recipe", default="finetune", choices=["finetune", "scratch"],
                        help="the trunk's norm as benchmarks/benchmark.py builds it: finetune = FrozenBatchNorm2d, "
                             "scratch = BatchNorm (both fold into the convs at inference)")
    parser.add_argument("--image-size", type=int, nargs="+", default=[512], help="H [W] of every image")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--detections-per-img", type=int, default=100)
    parser.add_argument("--size-divisible", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and ONNX Runtime intra-op threads; None = torch's default for both")
    parser.add_argument("--conditions", nargs="+", default=["fresh", "training"], choices=["fresh", "training"])
    parser.add_argument("--fresh-batch-size", type=int, default=4, help="images per step, condition fresh")
    parser.add_argument("--train-batch-size", type=int, default=2,
                        help="images per training and inference step, condition training")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model before the rounds")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--onnx", help="time this export of our model instead of exporting one (same settings!)")
    parser.add_argument("--int8-onnx", help="time this INT8 export (export.py --int8) instead of quantizing --onnx")
    parser.add_argument("--no-int8", action="store_true", help="leave the INT8 model out")
    parser.add_argument("--calibration-count", type=int, default=8, help="synthetic scenes the INT8 row is "
                        "calibrated on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as JSON here")
    return parser


class Contender:
    """One detector and how to run an inference step (and, for PyTorch, a training step) on it."""

    def __init__(self, name: str, model, optimizer=None):
        self.name, self.model, self.optimizer = name, model, optimizer
        self.images_per_s = {}

    @torch.no_grad()
    def infer(self, uint8_images: list, float_images: list) -> None:
        if self.name.startswith("onnxruntime"):
            for image in uint8_images:
                self.model(image.numpy())
        else:
            self.model.eval()
            self.model(uint8_images if self.name == "ours" else float_images)

    def train_step(self, images: list, targets: list) -> None:
        if self.optimizer is None:
            return
        self.model.train()
        losses = self.model(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()

    def timed(self, iters: int, uint8_images: list, float_images: list) -> float:
        start = time.perf_counter()
        for _ in range(iters):
            self.infer(uint8_images, float_images)
        return len(uint8_images) * iters / (time.perf_counter() - start)


def run_condition(condition: str, contenders: list, args, generator) -> dict:
    batch = args.fresh_batch_size if condition == "fresh" else args.train_batch_size
    float_images, targets = make_batch(batch, args.size, 5, args.num_classes, generator)
    uint8_images = [(image * 255).round().to(torch.uint8) for image in float_images]
    float_images = [image.float() / 255 for image in uint8_images]  # exactly what the others see
    rates = {c.name: [] for c in contenders}
    for round_index in range(-1, args.repeats):  # round -1: the warm-up
        if condition == "training":  # as in train.py: inference in a process that trains
            for contender in contenders:
                contender.train_step(float_images, targets)
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            if round_index < 0:
                contender.timed(args.warmup, uint8_images, float_images)
            else:
                rates[contender.name].append(contender.timed(args.iters, uint8_images, float_images))
    result = {"batch_size": batch}
    for name, values in rates.items():
        result[name] = {"images_per_s": statistics.median(values), "all": values}
    for a, b in RATIOS:
        if a in result and b in result:
            result[f"{a}/{b}"] = result[a]["images_per_s"] / result[b]["images_per_s"]
    return result


def print_table(report: dict) -> None:
    height, width = report["image_size"]
    print(f"\n{report['backbone']} ({report['recipe']}), {height}x{width} images, {report['num_classes']} classes, "
          f"CPU, {report['threads']} threads, torch {report['torch']}, onnxruntime {report['onnxruntime_version']}; "
          f"median of {report['repeats']} alternating rounds x {report['iters']} steps")
    names = [name for name in NAMES if name in report[report["conditions"][0]]]
    ratios = [f"{a}/{b}" for a, b in RATIOS if a in names and b in names]
    print(f"{'condition':<28s}" + "".join(f"{name + ' img/s':>22s}" for name in names)
          + "".join(f"{r:>32s}" for r in ratios))
    for condition in report["conditions"]:
        result = report[condition]
        label = f"{condition} (batch {result['batch_size']})"
        cells = "".join(f"{result[name]['images_per_s']:>22.2f}" for name in names)
        print(f"{label:<28s}{cells}" + "".join(f"{result[r]:>31.2f}x" for r in ratios))


def main(args) -> dict:
    if len(args.image_size) > 2:
        raise SystemExit(f"error: --image-size takes H or H W, got {args.image_size}")
    args.size = (args.image_size[0], args.image_size[-1])
    args.image_size = list(args.size)  # what build_ours / build_torchvision_retinanet read
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    torch.manual_seed(args.seed)
    ours = build_ours(args).eval()
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = args.onnx
        if onnx_path is None:
            onnx_path = os.path.join(folder, "model.onnx")
            start = time.perf_counter()
            export_float(ours, onnx_path, args.num_classes)  # the plain model, as export.py
            print(f"exported in {time.perf_counter() - start:.1f} s")
        detector = OnnxDetector(onnx_path, device="cpu", threads=threads)
        contenders = [Contender("onnxruntime", detector)]
        if not args.no_int8:
            int8_path = args.int8_onnx
            if int8_path is None:
                int8_path = os.path.join(folder, "model_int8.onnx")
                start = time.perf_counter()
                quantize_on_scenes(onnx_path, int8_path, args.size, args.calibration_count)
                print(f"quantized in {time.perf_counter() - start:.1f} s")
            contenders.insert(0, Contender("onnxruntime_int8", OnnxDetector(int8_path, device="cpu", threads=threads)))
        ours.optimize_for(torch.device("cpu"))  # as inference.py runs it
        torch.manual_seed(args.seed)
        torchvision_model = build_torchvision_retinanet(args).eval()
        for name, model in (("ours", ours), ("torchvision", torchvision_model)):
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
            contenders.append(Contender(name, model, optimizer if "training" in args.conditions else None))
        generator = torch.Generator().manual_seed(args.seed)
        report = {"backbone": args.backbone, "recipe": args.recipe, "image_size": list(args.size),
                  "num_classes": args.num_classes, "threads": threads, "iters": args.iters,
                  "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
                  "onnxruntime_version": onnxruntime.__version__, "conditions": []}
        # fresh first: after a training step the process is no longer an inference-only one.
        for condition in sorted(args.conditions, key=("fresh", "training").index):
            report[condition] = run_condition(condition, contenders, args, generator)
            report["conditions"].append(condition)
    print_table(report)
    if args.output:
        write_json_atomic(args.output, report)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
