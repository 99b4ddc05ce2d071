"""Logging: console on rank 0 (a log file beside it), one JSON line per record in log.jsonl, optional TensorBoard.

Every entry script calls :func:`setup_logging` once; modules log through
``logging.getLogger(__name__)``, entry scripts through their own name.
"""
import json
import logging
import os
import sys

from utils.runtime.distributed import is_main_process


def setup_logging(output_dir: str = None, file_name: str = "train.log", verbose: bool = True) -> None:
    """INFO on rank 0 to stdout (and ``output_dir/file_name``), only warnings on the other ranks.

    ``verbose=False`` leaves out the time and level (evaluation and inference print tables and
    one-line summaries that read better bare).
    """
    level = logging.INFO if is_main_process() else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if output_dir and is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, file_name)))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
                                  datefmt="%H:%M:%S")
    root = logging.getLogger()
    # Replace the handlers an earlier call made, and only those: others (pytest's capture,
    # an application embedding us) keep working.
    for handler in list(root.handlers):
        if getattr(handler, "_from_setup_logging", False):
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        handler._from_setup_logging = True
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)


class MetricWriter:
    """Appends metric dicts to ``log.jsonl`` (and TensorBoard when installed) on rank 0 only."""

    def __init__(self, output_dir: str, use_tensorboard: bool = True):
        self.enabled = is_main_process() and output_dir is not None
        self.path = os.path.join(output_dir, "log.jsonl") if self.enabled else None
        self.tensorboard = None
        if self.enabled and use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional dependency
                self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                self.tensorboard = None

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
