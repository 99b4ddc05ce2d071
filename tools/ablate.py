"""The paper's ablations (Table 1) from one command: a grid of training runs on the same data with
the same seed and the same iteration budget, each evaluated with COCO AP, in one table.

    python tools/ablate.py --grid loss                   # CE / alpha-CE / OHEM / FL on the demo data
    python tools/ablate.py --grid gamma --iters 1000     # Table 1b
    python tools/ablate.py --set focal_gamma=0,1,2 --set focal_alpha=0.25,0.75   # a free grid (product)
    python tools/ablate.py --grid ohem --data-path /data/coco --min-size 600 --max-size 1000 --amp fp16

Every option ablate.py does not know goes to each cell's train.py (data, model, optimisation,
runtime flags). Grids: alpha-ce (1a), gamma (1b), anchors (1c), ohem (1d), loss, scale (1e and
Figure 2), see tools/ablation_grids.py. The budget is in iterations (``train.py --iters``), not
wall time, so a busy machine changes how long a grid takes, never its numbers.

Each cell trains as a train.py subprocess in OUTPUT/cells/NAME/. A finished cell (its
``cell.json``) is not run again and a killed one resumes from its newest checkpoint, so the
same command continues an interrupted grid. After every cell OUTPUT/ablation.md (the table),
ablation.json and ablation.png are rewritten.
"""
import argparse
import contextlib
import io
import json
import logging
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the ablation_* modules beside this script

import torch  # noqa: E402

from ablation_grids import GRIDS, cell_flags, cell_label, cell_slug, combine, grid_cells, parse_set  # noqa: E402
from ablation_report import write_report  # noqa: E402
import coco_dataset  # noqa: E402
from model.weights import load_detector, read_weights  # noqa: E402
from recipes import get_args_parser as train_args_parser, resolve_config  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.device import resolve_device  # noqa: E402
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error  # noqa: E402
from utils.runtime.logger import setup_logging  # noqa: E402

logger = logging.getLogger("ablate")

# ablate.py decides these for every cell itself.
RESERVED_FLAGS = ("--output-dir", "--iters", "--epochs", "--max-iters", "--resume", "--eval-only")
# Demo: 1000 iterations of batch 8 (8000 images, 2.7 epochs) take ~7 min per cell on 2 CPU cores.
# COCO: the paper's 90k iterations at batch 16.
DEFAULT_ITERS = {"demo": 1000, "coco": 90000}


def get_args_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an abbreviated train.py flag must reach train.py, not match one of ours.
    parser = argparse.ArgumentParser(
        "RetinaNet ablations", allow_abbrev=False,
        description="Train and evaluate a grid of settings with the same data, seed and iteration budget. "
                    "Every other option is passed to train.py for each cell.")
    parser.add_argument("--grid", choices=sorted(GRIDS), help="a built-in grid: " + "; ".join(
        f"{name}: {description}" for name, (description, _) in GRIDS.items()).replace("%", "%%"))
    parser.add_argument("--set", action="append", metavar="KEY=V1,V2",
                        help="a free grid axis (train.py option name and values; repeat for a product; with "
                             "--grid, applied to every grid cell)")
    parser.add_argument("--iters", type=int, help="iterations per cell (default: demo recipe 1000, coco 90000)")
    parser.add_argument("--output-dir", help="grid folder (default: output/ablation/GRID)")
    parser.add_argument("--timing-images", type=int, default=50,
                        help="validation images timed at batch 1 for ms/img, after 2 warm-up passes (default: 50)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed cells again (default: keep their "
                        "result)")
    parser.add_argument("--dry-run", action="store_true", help="print every cell's train.py command and exit")
    parser.add_argument("--quiet", action="store_true",
                        help="train.py's output only to each cell's console.log, not to the terminal")
    return parser


def resolve_cell(flags: list, label: str):
    """train.py's own parser and resolve_config on ``flags``, so a bad value fails before any cell runs."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = train_args_parser().parse_args(flags)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        raise ConfigError(f"cell {label!r}: {message[-1] if message else 'invalid train.py flags'} "
                          f"(train.py {' '.join(flags)})") from None
    try:
        return resolve_config(args)
    except ConfigError as exc:
        raise ConfigError(f"cell {label!r}: {exc}") from None


def plan_cells(args, train_args: list) -> tuple:
    """The cells to run (label, settings, train.py flags, resolved config) and the budget."""
    if args.grid is None and not args.set:
        raise ConfigError("give --grid NAME or at least one --set KEY=V1,V2 (see --help)")
    reserved = [flag for flag in train_args if flag.split("=")[0] in RESERVED_FLAGS]
    if reserved:
        raise ConfigError(f"{reserved[0].split('=')[0]} is set by ablate.py for every cell; use ablate.py's "
                          "--iters / --output-dir, and re-run the same command to resume")
    base = resolve_cell(train_args, "common flags")
    iters = args.iters if args.iters is not None else DEFAULT_ITERS.get(base.recipe, DEFAULT_ITERS["coco"])
    if iters < 1:
        raise ConfigError(f"--iters {iters}: must be >= 1")
    settings = combine(grid_cells(args.grid, base.recipe == "demo") if args.grid else [], parse_set(args.set or []))
    cells = []
    for cell in settings:
        label = cell_label(cell)
        flags = [*train_args, *cell_flags(cell), "--iters", str(iters)]
        cells.append({"label": label, "slug": cell_slug(cell), "settings": cell, "train_args": flags,
                      "config": resolve_cell(flags, label)})
    slugs = [cell["slug"] for cell in cells]
    duplicate = next((s for s in slugs if slugs.count(s) > 1), None)
    if duplicate:
        raise ConfigError(f"two cells have the same settings ({duplicate}); check --grid / --set")
    return cells, iters


def run_logged(command: list, log_path: Path, echo: bool) -> tuple:
    """Run ``command``, its output into ``log_path`` (and the terminal); returns (exit code, interrupted).

    Ctrl-C reaches the child too (same process group): it checkpoints and exits, and we wait for
    it. A SIGTERM sent to ablate.py is passed on, so the child stops the same clean way.
    """
    interrupted = False
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
        try:
            while True:
                try:
                    chunk = proc.stdout.read1(1 << 16)
                except KeyboardInterrupt:
                    interrupted = True
                    proc.send_signal(signal.SIGTERM)  # in case the Ctrl-C was sent to ablate.py alone
                    continue
                if not chunk:
                    break
                log.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return proc.wait(), interrupted


def last_error_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").replace("\r", "\n").splitlines()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    tail = [line for line in lines if line]
    return f"crashed ({tail[-1] if tail else 'no output'}); see {log_path}"


def training_summary(cell_dir: Path) -> tuple:
    """(iterations trained, median training images/s) from the cell's log.jsonl."""
    records = [json.loads(line) for line in (cell_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r.get("type") == "train"]
    if not train_records:
        return None, None
    speeds = [r["images_per_s"] for r in (train_records[1:] or train_records)]  # the first window includes start-up
    return train_records[-1]["iteration"], statistics.median(speeds)


def measure_inference_ms(checkpoint: Path, data_path: str, split: str, device: torch.device,
                         num_images: int) -> float:
    """Median ms per image of ``model([image])`` on the first ``num_images`` of ``split`` (decoded
    beforehand: only the detector is timed, its resizing and post-processing included)."""
    model, _ = load_detector(read_weights(str(checkpoint), what="checkpoint"))
    model = model.to(device).optimize_for(device)
    dataset = coco_dataset.build_dataset(data_path, split)
    images = [dataset[i][0] for i in range(min(num_images, len(dataset)))]
    times = []
    with torch.no_grad():
        for index, image in enumerate(images[:1] * 2 + images):  # two warm-up passes
            image = image.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model([image])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= 2:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) if times else None


def read_record(cell_dir: Path, cell: dict):
    """The cell's ``cell.json`` (None if it has not started); one written for other flags is an error,
    since resuming or skipping it would mix two settings in one table."""
    path = cell_dir / "cell.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("train_args") != cell["train_args"]:
        raise ConfigError(f"{cell_dir} holds a cell run with other flags "
                          f"({' '.join(record.get('train_args', []))}); use another --output-dir, or delete "
                          "that folder to run it again")
    return record


def run_cell(cell: dict, cell_dir: Path, args) -> dict:
    """Train (or resume, or skip) one cell, then evaluate and time it; returns its record."""
    record_path = cell_dir / "cell.json"
    config = cell["config"]
    command = [sys.executable, str(REPO / "train.py"), *cell["train_args"], "--output-dir", str(cell_dir),
               "--resume", "auto"]
    record = read_record(cell_dir, cell)
    if record and (record["status"] == "done" or (record["status"] == "failed" and not args.retry_failed)):
        logger.info("%s: %s before, skipped", cell["label"], record["status"])
        return record
    cell_dir.mkdir(parents=True, exist_ok=True)
    final = cell_dir / "model_final.pth"
    base = {"label": cell["label"], "settings": cell["settings"], "train_args": cell["train_args"],
            "command": " ".join(command)}
    # Written first, so that a resumed cell is checked against the flags it started with.
    write_json_atomic(record_path, {**base, "status": "running"})
    if not final.is_file():
        returncode, interrupted = run_logged(command, cell_dir / "console.log", echo=not args.quiet)
        if interrupted or (returncode == 0 and not final.is_file()):
            raise UserError(f"stopped during cell {cell['label']!r}; run the same command again to continue "
                            "(finished cells are kept, this one resumes from its checkpoint)")
        if returncode != 0:
            record = {**base, "status": "failed", "error": last_error_line(cell_dir / "console.log")}
            logger.warning("%s failed: %s", cell["label"], record["error"])
            write_json_atomic(record_path, record)
            return record
    metrics_path = cell_dir / f"eval_{config.val_split}" / "metrics.json"
    if not metrics_path.is_file():  # killed between the last checkpoint and the end of the evaluation
        run_logged([sys.executable, str(REPO / "evaluation.py"), "--checkpoint", str(final), "--output-dir",
                    str(metrics_path.parent), "--workers", "0"], cell_dir / "console.log", echo=not args.quiet)
    if not metrics_path.is_file():
        raise UserError(f"{cell['label']}: no evaluation in {metrics_path.parent}; see {cell_dir / 'console.log'}")
    metrics = {k: v for k, v in json.loads(metrics_path.read_text()).items() if k != "per_category"}
    iterations, images_per_s = training_summary(cell_dir)
    device = resolve_device(config.device)
    ms_per_image = measure_inference_ms(final, config.data_path, config.val_split, device, args.timing_images)
    record = {**base, "status": "done", "metrics": metrics, "iterations": iterations,
              "train_images_per_s": images_per_s, "inference_ms_per_image": ms_per_image}
    write_json_atomic(record_path, record)
    logger.info("%s: AP %.1f, AP50 %.1f (%s iterations, %.1f train img/s, %.1f ms/img)", cell["label"],
                100 * (metrics.get("AP") or 0), 100 * (metrics.get("AP50") or 0), iterations, images_per_s or 0,
                ms_per_image or 0)
    return record


def main(argv: list) -> list:
    """``argv``: ablate.py's command line; returns the cell records (empty with --dry-run)."""
    args, train_args = get_args_parser().parse_known_args(argv)
    cells, iters = plan_cells(args, train_args)
    name = args.grid or "custom"
    output_dir = Path(args.output_dir or Path("output") / "ablation" / name)
    if args.dry_run:
        for cell in cells:
            print(f"{cell['label']}:\n  python train.py {' '.join(cell['train_args'])} --output-dir "
                  f"{output_dir / 'cells' / cell['slug']} --resume auto")
        return []
    output_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(str(output_dir), "ablate.log")
    if cells[0]["config"].num_threads:
        torch.set_num_threads(cells[0]["config"].num_threads)
    grid = {"name": name, "description": GRIDS[args.grid][0] if args.grid else f"--set {' --set '.join(args.set)}",
            "command": "python tools/ablate.py " + " ".join(shlex.quote(a) for a in argv), "iters": iters,
            "common_args": train_args}
    # Before any training: every cell already in output_dir must have been started with the same flags.
    records = [read_record(output_dir / "cells" / cell["slug"], cell)
               or {"label": cell["label"], "settings": cell["settings"]} for cell in cells]
    logger.info("%d cells of %d iterations each in %s", len(cells), iters, output_dir)
    for index, cell in enumerate(cells):
        logger.info("cell %d/%d: %s", index + 1, len(cells), cell["label"])
        records[index] = run_cell(cell, output_dir / "cells" / cell["slug"], args)
        write_report(output_dir, grid, records)
    logger.info("table: %s", output_dir / "ablation.md")
    return records


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
