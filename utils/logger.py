"""Logging: console on rank 0, one JSON line per record in log.jsonl, optional TensorBoard."""
import json
import logging
import os
import sys

from utils.distributed import is_main_process


def setup_logging(output_dir: str = None) -> logging.Logger:
    """Console (and ``output_dir/train.log``) logging on rank 0; warnings only elsewhere."""
    level = logging.INFO if is_main_process() else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if output_dir and is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)
    return logging.getLogger("retinanet")


class MetricWriter:
    """Appends metric dicts to ``log.jsonl`` (and TensorBoard when installed) on rank 0 only."""

    def __init__(self, output_dir: str, use_tensorboard: bool = True):
        self.enabled = is_main_process() and output_dir is not None
        self.path = os.path.join(output_dir, "log.jsonl") if self.enabled else None
        self.tensorboard = None
        if self.enabled and use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tensorboard = None  # optional: never required

    def write(self, record: dict, step: int = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "iteration"):
                    self.tensorboard.add_scalar(f"{record.get('type', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
