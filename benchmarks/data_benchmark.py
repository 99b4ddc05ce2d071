"""How many training images per second the data pipeline delivers, per worker count.

    python benchmarks/data_benchmark.py                                  # the demo dataset, 0 1 2 4 workers
    python benchmarks/data_benchmark.py --data-path /data/coco --split train2017 --workers 4 8 16

It runs exactly what train.py runs -- ``coco_dataset.build_dataset`` (decoding,
target conversion, random flip) behind ``utils.data.loaders.build_train_loader`` (seeded
sampler, aspect-ratio grouping, collation) -- and drains ``--batches`` batches per
worker count. Compare the numbers with the training images/s of
``benchmarks/benchmark.py`` (or train.py's log) at the same batch size: if the
loader delivers fewer images per second than the model consumes, training waits
on data and more workers (or faster storage / decoding) will help; otherwise the
accelerator is the bottleneck. The first batch (worker start-up) is timed apart.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.runtime.atomic_io import write_json_atomic  # noqa: E402

import coco_dataset  # noqa: E402
from utils.data.loaders import build_train_loader  # noqa: E402

DEMO_ROOT = Path(__file__).resolve().parents[1] / "data" / "demo"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("RetinaNet data-loading speed",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-path", default=str(DEMO_ROOT), help="COCO-format root with annotations/ and <split>/")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4], help="worker counts to try")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (per process)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per worker count")
    parser.add_argument("--hflip-prob", type=float, default=0.5)
    parser.add_argument("--no-aspect-ratio-grouping", dest="aspect_ratio_grouping", action="store_false")
    parser.add_argument("--pin-memory", action="store_true",
                        help="copy batches into page-locked memory, as train.py does on CUDA (needs CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser


def _ensure_data(args) -> None:
    ann_file = Path(args.data_path) / "annotations" / f"instances_{args.split}.json"
    if ann_file.is_file():
        return
    if Path(args.data_path).resolve() != DEMO_ROOT.resolve():
        raise FileNotFoundError(f"no annotations at {ann_file}; check --data-path and --split")
    from utils.data.demo_data import ensure_demo_dataset
    ensure_demo_dataset(str(DEMO_ROOT))


def time_loader(dataset, args, workers: int) -> dict:
    """Drain ``args.batches`` batches (after the first) with ``workers`` worker processes."""
    loader = build_train_loader(dataset, args.batch_size, workers, args.seed,
                                aspect_ratio_grouping=args.aspect_ratio_grouping,
                                pin_memory=getattr(args, "pin_memory", False))
    loader.batch_sampler.set_epoch(0)
    images, batches, batch_times = 0, 0, []
    start = time.perf_counter()
    iterator = iter(loader)
    first_batch_s = last = None
    epoch = 0
    while batches < args.batches:
        try:
            batch_images, _, _ = next(iterator)
        except StopIteration:  # a small dataset: keep going with the next epoch
            epoch += 1
            loader.batch_sampler.set_epoch(epoch)
            iterator = iter(loader)
            continue
        now = time.perf_counter()
        if first_batch_s is None:
            first_batch_s, timed_start = now - start, now
        else:
            batches += 1
            images += len(batch_images)
            batch_times.append(now - last)
        last = now
    elapsed = time.perf_counter() - timed_start
    del iterator, loader  # shuts the workers down before the next setting starts its own
    return {"workers": workers, "images_per_s": images / elapsed, "batches": batches,
            "median_batch_ms": 1e3 * statistics.median(batch_times), "first_batch_s": first_batch_s}


def main(args) -> dict:
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    _ensure_data(args)
    dataset = coco_dataset.build_dataset(args.data_path, args.split, train=True)
    print(f"{args.data_path} [{args.split}]: {len(dataset)} images, batch {args.batch_size}, "
          f"{args.batches} timed batches per setting, {os.cpu_count()} CPUs")
    print(f"{'workers':>8s} {'images/s':>10s} {'ms/batch (median)':>18s} {'first batch s':>14s}")
    results = []
    for workers in args.workers:
        result = time_loader(dataset, args, workers)
        results.append(result)
        print(f"{workers:8d} {result['images_per_s']:10.1f} {result['median_batch_ms']:18.1f} "
              f"{result['first_batch_s']:14.2f}")
    best = max(results, key=lambda r: r["images_per_s"])
    print(f"best: {best['workers']} workers, {best['images_per_s']:.1f} images/s; compare with the model's "
          f"training images/s (benchmarks/benchmark.py) at batch {args.batch_size}")
    report = {"data_path": str(args.data_path), "split": args.split, "num_images": len(dataset),
              "batch_size": args.batch_size, "batches": args.batches, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "results": results}
    if args.output:
        write_json_atomic(args.output, report)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
