"""Speed and memory of sliced inference (``model/tiling.py``) on one large synthetic image.

    python benchmarks/tiling_benchmark.py --threads 2 --output-dir benchmarks/results   # 10000 x 10000, R-18 crop 256
    python benchmarks/tiling_benchmark.py --image-size 1500 --output-dir /tmp/tiles      # a quick check, seconds
    python benchmarks/tiling_benchmark.py --device cuda --tile-batch 32 --output-dir benchmarks/results

The model (random weights, so only the speed means something) is what a user training on
crops of a large-image dataset would have: ResNet-18, FPN 128 channels, trained on 256 x 256
crops at native resolution (``--crop-size``, ``--crop-scale``), so it tiles by default with
256 px windows, overlap 0.25. The image is uniform noise (the speed of a convolution does
not depend on the pixels), made directly as uint8 so that nothing but the image itself
occupies memory before the call.

Measured over one ``TiledDetector`` call on the whole image, after a warm-up call on one
window: windows per second (cutting, model, merge: the whole call), the model's and the
merge's seconds, and memory: the process's resident set before the call, its high-water mark
(``resource.getrusage``, ``ru_maxrss``) after it and the difference, which is what sliced
inference costs beyond the image (a whole-image float copy would add 12 bytes a pixel);
on CUDA also ``torch.cuda.max_memory_allocated``. Python's tracemalloc would not see
torch's buffers, so it is not used. Results are printed and written as
``tiling_<device>_<H>x<W>.json`` and ``.md`` into ``--output-dir``.
"""
import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import BACKBONES, ModelConfig, RetinaNet  # noqa: E402
from model.tile_merge import DEFAULT_MERGE, MERGE_METHODS  # noqa: E402
from model.tiling import (DEFAULT_OVERLAP, DEFAULT_TILE_BATCH, TiledDetector, TileOptions, tile_detector,  # noqa: E402
                          tile_positions)
from utils.runtime.atomic_io import atomic_write, write_json_atomic  # noqa: E402

MIB = 2 ** 20


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tiling_benchmark.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--image-size", type=int, nargs="+", default=[10000], metavar="PX",
                        help="H (square) or H W of the synthetic image")
    parser.add_argument("--backbone", default="resnet18", choices=sorted(BACKBONES))
    parser.add_argument("--fpn-channels", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--crop-size", type=int, default=256, help="the model's training window (its input size)")
    parser.add_argument("--crop-scale", type=float, default=1.0, help="the scale it was trained at")
    parser.add_argument("--tile", type=int, help="window side in image pixels; None = the model's own "
                        "(crop_size / crop_scale)")
    parser.add_argument("--tile-overlap", type=float, default=DEFAULT_OVERLAP)
    parser.add_argument("--tile-merge", choices=MERGE_METHODS, default=DEFAULT_MERGE)
    parser.add_argument("--tile-whole-image", action="store_true", help="add the whole-image pass")
    parser.add_argument("--tile-batch", type=int, default=DEFAULT_TILE_BATCH, help="windows per model call")
    parser.add_argument("--score-thresh", type=float, default=0.05, help="the model's score threshold")
    parser.add_argument("--prior-prob", type=float, default=0.01, help="the classifier's prior: with random "
                        "weights it sets how many detections there are to merge (0.01: few)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch threads (None: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="benchmarks/results", help="where the JSON and MD go")
    return parser


def resident_mib() -> float:
    """The process's resident set now (Linux /proc; elsewhere the high-water mark stands in)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        return peak_resident_mib()


def peak_resident_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def build_model(args, device: torch.device) -> RetinaNet:
    config = ModelConfig(num_classes=args.num_classes, backbone=args.backbone, fpn_channels=args.fpn_channels,
                         crop_size=args.crop_size, crop_scale=args.crop_scale, min_size=args.crop_size,
                         max_size=args.crop_size, score_thresh=args.score_thresh, prior_prob=args.prior_prob)
    return RetinaNet.from_config(config).eval().to(device).optimize_for(device)


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    height, width = (args.image_size * 2)[:2]
    torch.manual_seed(args.seed)
    model = build_model(args, device)
    detector = tile_detector(model, TileOptions(tile=args.tile, overlap=args.tile_overlap, merge=args.tile_merge,
                                                whole_image=args.tile_whole_image, batch=args.tile_batch))
    if not isinstance(detector, TiledDetector):
        raise SystemExit("error: nothing to tile: give --crop-size > 0 or --tile N")
    windows = len(tile_positions(height, width, detector.tile, detector.overlap))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(args.seed)).to(device)
    detector([image[:, :detector.tile, :detector.tile]])  # warm-up: first-call allocations and kernel choices
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resident_mib()
    start = time.perf_counter()
    output = detector([image])[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_resident_mib()
    stats = detector.last_stats
    report = {
        "conditions": {"image_size": [height, width], "tile": detector.tile, "overlap": detector.overlap,
                       "merge": detector.merge, "whole_image": detector.whole_image, "tile_batch": detector.tile_batch,
                       "windows": windows, "backbone": args.backbone, "fpn_channels": args.fpn_channels,
                       "crop_size": args.crop_size, "crop_scale": args.crop_scale, "device": str(device),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "results": {"seconds": seconds, "windows_per_s": stats["windows"] / seconds,
                    "model_seconds": stats["model_seconds"], "merge_seconds": stats["merge_seconds"],
                    "detections": len(output["scores"]), "image_mib": image.numel() / MIB,
                    "rss_before_mib": rss_before, "peak_rss_mib": peak, "rss_growth_mib": peak - rss_before,
                    "cuda_peak_mib": torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None},
    }
    write_report(report, Path(args.output_dir), f"tiling_{device.type}_{height}x{width}")
    return report


def markdown(report: dict) -> str:
    c, r = report["conditions"], report["results"]
    lines = [f"# Sliced inference: {c['image_size'][0]} x {c['image_size'][1]} image, {c['device']}", "",
             f"{c['backbone']} FPN {c['fpn_channels']}, crop {c['crop_size']} at scale {c['crop_scale']}; "
             f"windows of {c['tile']} px, overlap {c['overlap']}, merge {c['merge']}"
             f"{' + whole image' if c['whole_image'] else ''}, {c['tile_batch']} windows per call; "
             f"{c['threads']} threads, torch {c['torch']}", "",
             "| windows | s | windows/s | model s | merge s | detections | image MiB | RSS before MiB | "
             "peak RSS MiB | growth MiB | CUDA peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {c['windows']} | {r['seconds']:.1f} | {r['windows_per_s']:.2f} | {r['model_seconds']:.1f} | "
             f"{r['merge_seconds']:.2f} | {r['detections']} | {r['image_mib']:.0f} | {r['rss_before_mib']:.0f} | "
             f"{r['peak_rss_mib']:.0f} | {r['rss_growth_mib']:.0f} | "
             f"{'-' if r['cuda_peak_mib'] is None else format(r['cuda_peak_mib'], '.0f')} |", ""]
    return "\n".join(lines)


def write_report(report: dict, output_dir: Path, stem: str) -> None:
    text = markdown(report)
    print(text)
    write_json_atomic(output_dir / f"{stem}.json", report)
    atomic_write(output_dir / f"{stem}.md", lambda f: f.write(text), binary=False)
    print(f"wrote {output_dir / stem}.json and .md")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
