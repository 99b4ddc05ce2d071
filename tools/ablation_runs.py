"""One run of an ablation grid: train.py as a subprocess in its own folder (skipped when done,
resumed when interrupted), then its evaluation, training speed and inference time, recorded
in its ``cell.json`` (the record tools/ablation_report.py describes).
"""
import json
import logging
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import coco_dataset
from model.weights import load_detector, read_weights
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.device import resolve_device
from utils.runtime.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger("ablate")


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


def run_cell(cell: dict, cell_dir: Path, *, retry_failed: bool, echo: bool, timing_images: int,
             time_inference: bool = True) -> dict:
    """Train (or resume, or skip) one cell (or one seed of it), then evaluate and time it on
    ``timing_images`` images (unless not ``time_inference``); returns its record. ``cell``: ``label``,
    ``settings``, ``train_args``, ``config`` (resolved) and ``seed`` for a seeded grid. A failed run is
    kept unless ``retry_failed``; ``echo`` shows train.py's output on the terminal too."""
    record_path = cell_dir / "cell.json"
    config = cell["config"]
    command = [sys.executable, str(REPO / "train.py"), *cell["train_args"], "--output-dir", str(cell_dir),
               "--resume", "auto"]
    name = cell["label"] + (f" seed {cell['seed']}" if "seed" in cell else "")
    record = read_record(cell_dir, cell)
    if record and (record["status"] == "done" or (record["status"] == "failed" and not retry_failed)):
        logger.info("%s: %s before, skipped", name, record["status"])
        return record
    cell_dir.mkdir(parents=True, exist_ok=True)
    final = cell_dir / "model_final.pth"
    base = {"label": cell["label"], "settings": cell["settings"], **({"seed": cell["seed"]} if "seed" in cell else {}),
            "train_args": cell["train_args"], "command": " ".join(command)}
    # Written first, so that a resumed cell is checked against the flags it started with.
    write_json_atomic(record_path, {**base, "status": "running"})
    if not final.is_file():
        returncode, interrupted = run_logged(command, cell_dir / "console.log", echo=echo)
        if interrupted or (returncode == 0 and not final.is_file()):
            raise UserError(f"stopped during cell {name!r}; run the same command again to continue "
                            "(finished cells are kept, this one resumes from its checkpoint)")
        if returncode != 0:
            record = {**base, "status": "failed", "error": last_error_line(cell_dir / "console.log")}
            logger.warning("%s failed: %s", name, record["error"])
            write_json_atomic(record_path, record)
            return record
    metrics_path = cell_dir / f"eval_{config.val_split}" / "metrics.json"
    if not metrics_path.is_file():  # killed between the last checkpoint and the end of the evaluation
        run_logged([sys.executable, str(REPO / "evaluation.py"), "--checkpoint", str(final), "--output-dir",
                    str(metrics_path.parent), "--workers", "0"], cell_dir / "console.log", echo=echo)
    if not metrics_path.is_file():
        raise UserError(f"{name}: no evaluation in {metrics_path.parent}; see {cell_dir / 'console.log'}")
    metrics = {k: v for k, v in json.loads(metrics_path.read_text()).items() if k != "per_category"}
    iterations, images_per_s = training_summary(cell_dir)
    # Seeds change the weights, not the architecture: one timing per cell is enough and saves CPU.
    ms_per_image = measure_inference_ms(final, config.data_path, config.val_split, resolve_device(config.device),
                                        timing_images) if time_inference else None
    record = {**base, "status": "done", "metrics": metrics, "iterations": iterations,
              "train_images_per_s": images_per_s, "inference_ms_per_image": ms_per_image}
    write_json_atomic(record_path, record)
    logger.info("%s: AP %.1f, AP50 %.1f (%s iterations, %.1f train img/s, %.1f ms/img)", name,
                100 * (metrics.get("AP") or 0), 100 * (metrics.get("AP50") or 0), iterations, images_per_s or 0,
                ms_per_image or 0)
    return record
