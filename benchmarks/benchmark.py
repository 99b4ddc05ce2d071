"""Our RetinaNet against torchvision's, side by side in one process.

    python benchmarks/benchmark.py                                   # R-50, 512 px, batch 4, fp32
    python benchmarks/benchmark.py --channels-last --output bench.json
    python benchmarks/benchmark.py --device cuda --amp fp16 --batch-size 8 --eval-batch-size 8

Both detectors get the same trunk, built the same way: by default as both libraries
build it for COCO training from ImageNet weights (``--recipe finetune``:
FrozenBatchNorm2d, stem and layer1 frozen; random values stand in for the weights,
which do not change the speed), or as they build it without pretrained weights
(``--recipe scratch``: trainable BatchNorm, every stage trained). Also the same FPN
(P6 from P5, torchvision v1's layout), class count, images (exactly
``--image-size H W``, with ``min_size``/``max_size`` set to the short/long side and the
same padding multiple on both, so neither resizes or pads differently), targets, dtype, device
and inference settings (score > 0.05, top 1000 per level, NMS 0.5,
``--detections-per-img`` on both).

Inference is timed first, then training, each phase after its own warm-up. In
each phase the two models are timed in alternation: every round runs one timed
block of each model (the order flips each round), and the table reports the
median over ``--repeats`` rounds, so background load hits both alike. Inference
comes first because a process that has trained keeps a fragmented, fully mapped
heap, which makes both models' inference cheaper than in an inference-only
process like ``inference.py`` (see benchmarks/README.md).

- training images/s: forward + loss + backward + SGD step, ``model(images, targets)``;
- inference images/s: ``model(list_of_images)`` in eval mode under ``no_grad``,
  pre- and post-processing included;
- peak memory: of one extra, untimed step per model and phase: CUDA
  ``max_memory_allocated``; on CPU the peak resident-set growth over the step after
  handing freed heap back to the OS (sampled every 2 ms, so an approximation; n/a
  where /proc is missing).
"""
import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.device import resolve_device  # noqa: E402

from model import BACKBONES, build_retinanet  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RetinaNet speed: ours vs torchvision",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES))
    parser.add_argument("--recipe", default="finetune", choices=["finetune", "scratch"],
                        help="finetune: the trunk as built for ImageNet weights (FrozenBatchNorm2d, stem and "
                             "layer1 frozen), what COCO training runs; scratch: trainable BatchNorm, all stages")
    parser.add_argument("--image-size", type=int, nargs="+", default=[512],
                        help="H [W]: images of exactly this size (W = H if omitted), e.g. 800 1333")
    parser.add_argument("--batch-size", type=int, default=4, help="images per training step")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="images per inference call; None = --batch-size")
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--boxes-per-image", type=int, default=5, help="random ground-truth boxes per training image")
    parser.add_argument("--detections-per-img", type=int, default=100,
                        help="set on both models (torchvision's own default is 300, ours 100)")
    parser.add_argument("--size-divisible", type=int, default=128, help="padding multiple, set on both models")
    parser.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"], help="autocast both forward passes")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format on both models")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda'")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; None = torch's default")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per model per round")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed iterations per model before the rounds (at least 2 with --compile)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate (small: random targets)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser


def build_torchvision_retinanet(args):
    """torchvision's RetinaNet as its builder makes it (with or without ImageNet weights), with our sizes."""
    import torchvision
    from torch import nn
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    kwargs = dict(min_size=min(args.image_size), max_size=max(args.image_size),
                  size_divisible=args.size_divisible, detections_per_img=args.detections_per_img,
                  score_thresh=0.05, nms_thresh=0.5, topk_candidates=1000)
    # What retinanet_resnet50_fpn does: FrozenBatchNorm2d and 3 trainable stages when it
    # loads ImageNet weights, BatchNorm and all 5 stages without.
    finetune = args.recipe == "finetune"
    norm_layer = FrozenBatchNorm2d if finetune else nn.BatchNorm2d
    trunk = getattr(torchvision.models, args.backbone)(weights=None, norm_layer=norm_layer)
    backbone = _resnet_fpn_extractor(trunk, 3 if finetune else 5, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, args.num_classes, **kwargs)


def build_ours(args):
    return build_retinanet(num_classes=args.num_classes, backbone=args.backbone, p6_from="p5",
                           backbone_norm="frozen_bn" if args.recipe == "finetune" else "bn",
                           trainable_backbone_layers=3, min_size=min(args.image_size), max_size=max(args.image_size),
                           size_divisible=args.size_divisible, detections_per_img=args.detections_per_img,
                           score_thresh=0.05, nms_thresh=0.5, topk_candidates=1000)


def make_batch(batch_size: int, image_size: tuple, boxes_per_image: int, num_classes: int, generator):
    """Random [0, 1] ``(H, W)`` images and a few random valid boxes (at least 8 px wide) per image."""
    height, width = image_size
    images = [torch.rand(3, height, width, generator=generator) for _ in range(batch_size)]
    scale = torch.tensor([width, height], dtype=torch.float32)
    targets = []
    for _ in range(batch_size):
        xy = torch.rand(boxes_per_image, 2, generator=generator) * scale * 0.7
        wh = 8 + torch.rand(boxes_per_image, 2, generator=generator) * (scale * 0.3 - 8)
        boxes = torch.cat([xy, torch.minimum(xy + wh, scale)], dim=1)
        labels = torch.randint(num_classes, (boxes_per_image,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS growth over a block is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS growth on CPU (bytes)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max_rss = max(self._max_rss, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            _release_free_heap()
            self._start_rss = self._max_rss = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max_rss, self._rss()) - self._start_rss
        return False


class Runner:
    """One model with its optimizer, and timed training / inference blocks."""

    def __init__(self, name: str, model, args, device, batches):
        self.name, self.model, self.args, self.device = name, model, args, device
        self.train_images, self.train_targets, self.eval_images = batches
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype is torch.float16)
        self.forward = torch.compile(model) if args.compile else model
        self.results = {"train_images_per_s": [], "eval_images_per_s": [], "train_peak_bytes": [],
                        "eval_peak_bytes": []}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> None:
        with self._autocast():
            losses = self.forward(self.train_images, self.train_targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @torch.no_grad()
    def eval_step(self) -> None:
        with self._autocast():
            self.forward(self.eval_images)

    def _step_fn(self, phase: str):
        self.model.train(phase == "train")
        return self.train_step if phase == "train" else self.eval_step

    def run(self, phase: str, iters: int, record: bool = True) -> None:
        step = self._step_fn(phase)
        images_per_iter = len(self.train_images if phase == "train" else self.eval_images)
        self._sync()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        self._sync()
        elapsed = time.perf_counter() - start
        if record:
            self.results[f"{phase}_images_per_s"].append(images_per_iter * iters / elapsed)

    def measure_memory(self, phase: str) -> None:
        """One more step, untimed: trimming the heap and sampling RSS would disturb the timings."""
        step = self._step_fn(phase)
        with PeakMemory(self.device) as memory:
            step()
            self._sync()
        self.results[f"{phase}_peak_bytes"].append(memory.peak)

    def summary(self) -> dict:
        out = {}
        for key, values in self.results.items():
            values = [v for v in values if v is not None]
            out[key] = statistics.median(values) if values else None
            out[key + "_all"] = values
        return out


def _describe(args, device) -> str:
    parts = [args.amp if args.amp != "none" else "fp32", "channels_last" if args.channels_last else "NCHW",
             "compiled" if args.compile else "eager", device.type]
    return ", ".join(parts)


def _row_label(name: str, args) -> str:
    extras = [x for x, on in (("channels_last", args.channels_last), ("compile", args.compile),
                              (args.amp, args.amp != "none")) if on]
    return f"{name} (defaults{''.join(' + ' + x for x in extras)})"


def _fmt(value, scale=1.0, digits=2) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}f}"


def print_table(report: dict, args) -> None:
    columns = [("train img/s", "train_images_per_s", 1.0, 2), ("infer img/s", "eval_images_per_s", 1.0, 2),
               ("train peak MiB", "train_peak_bytes", 2 ** 20, 0), ("infer peak MiB", "eval_peak_bytes", 2 ** 20, 0)]
    height, width = report["image_size"]
    print(f"\n{report['backbone']}, {height}x{width} images, train batch "
          f"{report['batch_size']}, eval batch {report['eval_batch_size']}, {report['num_classes']} classes, "
          f"{report['setting']}, {report['threads']} threads; median of {report['repeats']} alternating rounds "
          f"x {report['iters']} iters")
    print(f"both: min_size = {min(height, width)}, max_size = {max(height, width)} (no resizing), score > 0.05, "
          f"top-1000 per level, NMS 0.5, "
          f"{report['detections_per_img']} detections per image, SGD; recipe {report['recipe']} ("
          f"{'FrozenBatchNorm2d, stem + layer1 frozen' if report['recipe'] == 'finetune' else 'BatchNorm, all stages'}"
          f"); ours: build_retinanet defaults (p6_from='p5' as torchvision v1); torchvision: RetinaNet with "
          f"the trunk its retinanet_resnet50_fpn builds for this recipe; peak memory: "
          f"{'CUDA max allocated' if report['device'].startswith('cuda') else 'growth of the resident set'}")
    width = 44
    print(f"{'':{width}s}" + "".join(f"{title:>16s}" for title, *_ in columns))
    for name in ("ours", "torchvision"):
        cells = "".join(f"{_fmt(report[name][key], scale, digits):>16s}" for _, key, scale, digits in columns)
        print(f"{_row_label(name, args):{width}s}{cells}")
    ratios = []
    for _, key, _, _ in columns:
        a, b = report["ours"][key], report["torchvision"][key]
        ratios.append(f"{a / b:.2f}x" if a and b else "n/a")
    print(f"{'ours / torchvision':{width}s}" + "".join(f"{r:>16s}" for r in ratios))


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 is for CUDA; use --amp bf16 on CPU")
    eval_batch_size = args.eval_batch_size or args.batch_size
    generator = torch.Generator().manual_seed(args.seed)
    if len(args.image_size) > 2:
        raise ValueError(f"--image-size takes H or H W, got {args.image_size}")
    image_size = (args.image_size[0], args.image_size[-1])
    images, targets = make_batch(args.batch_size, image_size, args.boxes_per_image, args.num_classes, generator)
    eval_images, _ = make_batch(eval_batch_size, image_size, 1, args.num_classes, generator)
    images = [im.to(device) for im in images]
    eval_images = [im.to(device) for im in eval_images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    runners = []
    for name, builder in (("ours", build_ours), ("torchvision", build_torchvision_retinanet)):
        torch.manual_seed(args.seed)
        model = builder(args).to(device)
        if name == "ours":  # the execution choices train.py, evaluation.py and inference.py make
            model.optimize_for(device, channels_last=args.channels_last)
        elif args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        runners.append(Runner(name, model, args, device, (images, targets, eval_images)))

    phases = [p for p, skip in (("eval", args.skip_eval), ("train", args.skip_train)) if not skip]
    if args.compile and args.warmup < 2:
        # The first call compiles and the second may recompile once (caches first filled on
        # the first call, e.g. anchors, change what the guards see).
        args.warmup = 2
    for phase in phases:
        for runner in runners:
            runner.run(phase, args.warmup, record=False)
        for round_index in range(args.repeats):
            for runner in (runners if round_index % 2 == 0 else runners[::-1]):
                runner.run(phase, args.iters)
    for phase in phases:
        for runner in runners:
            runner.measure_memory(phase)

    report = {"setting": _describe(args, device), "device": str(device), "backbone": args.backbone,
              "recipe": args.recipe,
              "image_size": list(image_size), "batch_size": args.batch_size, "eval_batch_size": eval_batch_size,
              "num_classes": args.num_classes, "detections_per_img": args.detections_per_img,
              "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
              "threads": torch.get_num_threads(), "iters": args.iters, "warmup": args.warmup,
              "repeats": args.repeats, "torch": torch.__version__}
    for runner in runners:
        report[runner.name] = runner.summary()
    for key in ("train_images_per_s", "eval_images_per_s"):
        a, b = report["ours"][key], report["torchvision"][key]
        report[f"{key}_ratio"] = a / b if a and b else None
    print_table(report, args)
    if args.output:
        write_json_atomic(args.output, report)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
