"""Training curves from ``log.jsonl``: losses, learning rate, images/s and AP, several runs overlaid in one PNG.

``log.jsonl`` (utils.runtime.logger.MetricWriter) holds one JSON object per line: ``"type": "train"``
records every ``--print-freq`` iterations (``iteration``, ``loss``, ``classification``,
``bbox_regression``, ``lr``, ``images_per_s``, ...) and ``"type": "eval"`` records after each
evaluation (``iteration``, ``epoch``, ``AP``, ``AP50``, ...). A resumed run appends to the same
file, possibly going back to an earlier iteration: the later record of an iteration wins.

matplotlib is needed only to draw (:func:`plot_runs`); reading works without it.
"""
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from utils.runtime.errors import UserError
from utils.visual.plotting import figure_class

logger = logging.getLogger(__name__)

# (record key, panel title, y-axis label); the AP panel is drawn from the eval records.
TRAIN_PANELS = (("loss", "total loss", "loss"), ("classification", "classification loss", "loss"),
                ("bbox_regression", "box regression loss", "loss"), ("lr", "learning rate", "lr"),
                ("images_per_s", "training speed", "images / s"))


class LogFileError(UserError, ValueError):
    """A log.jsonl that is missing or holds no training record."""


@dataclass
class RunLog:
    """One run's records, each list sorted by iteration, one record per iteration."""
    label: str
    path: Path
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    num_unreadable: int = 0  # lines that are not JSON objects (a run killed mid-write leaves half a line)

    def series(self, key: str, kind: str = "train") -> tuple:
        """``(iterations, values)`` of ``key``, leaving out records without a finite value."""
        points = [(r["iteration"], r[key]) for r in (self.train if kind == "train" else self.eval)
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]


def log_path(path) -> Path:
    """A run's ``log.jsonl``: the path itself, or ``log.jsonl`` inside a run folder."""
    path = Path(path)
    return path / "log.jsonl" if path.is_dir() else path


def read_log(path, label: str = None) -> RunLog:
    """Parse one ``log.jsonl`` (or run folder); ``label`` defaults to the run folder's name."""
    path = log_path(path)
    if not path.is_file():
        raise LogFileError(f"training log {path} not found (train.py writes OUTPUT_DIR/log.jsonl)")
    by_kind = {"train": {}, "eval": {}}
    unreadable = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
                unreadable += 1
                continue
            kind = record.get("type", "train")
            if kind in by_kind:
                by_kind[kind][record["iteration"]] = record  # a resumed run's later record replaces the earlier
    run = RunLog(label or path.parent.name or str(path), path,
                 [by_kind["train"][i] for i in sorted(by_kind["train"])],
                 [by_kind["eval"][i] for i in sorted(by_kind["eval"])], unreadable)
    if not run.train and not run.eval:
        raise LogFileError(f"{path} holds no training or evaluation record"
                           f"{f' ({unreadable} unreadable lines)' if unreadable else ''}")
    if unreadable:
        logger.warning("%s: skipped %d unreadable line(s)", path, unreadable)
    return run


def unique_labels(paths: list) -> list:
    """Run folder names, made longer (parent folders) until they differ."""
    paths = [log_path(p).resolve() for p in paths]
    for depth in range(1, max((len(p.parts) for p in paths), default=1)):
        labels = ["/".join(p.parent.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def plot_runs(runs: list, output_path) -> Path:
    """Draw ``runs`` (:class:`RunLog`) into one PNG of six panels, one colour per run; returns its path.

    Panels: total, classification and box losses, learning rate, images/s (against the
    iteration) and AP / AP50 at each evaluation (AP50 dashed). Raises :class:`MatplotlibMissing` (an ImportError) without matplotlib.
    """
    figure = figure_class("plotting training curves")(figsize=(15, 8.5), layout="constrained")
    axes = figure.subplots(2, 3).ravel()
    colours = [f"C{k % 10}" for k in range(len(runs))]
    for axis, (key, title, ylabel) in zip(axes, TRAIN_PANELS):
        for run, colour in zip(runs, colours):
            iterations, values = run.series(key)
            if iterations:
                axis.plot(iterations, values, color=colour, linewidth=1.2, label=run.label,
                          marker="." if len(iterations) < 20 else None)
        axis.set(title=title, xlabel="iteration", ylabel=ylabel)
        if key == "lr" and any(run.series("lr")[1] for run in runs):
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axis.grid(alpha=0.3)
    ap_axis = axes[len(TRAIN_PANELS)]
    for run, colour in zip(runs, colours):
        for key, style in (("AP", "-"), ("AP50", "--")):
            iterations, values = run.series(key, "eval")
            if iterations:
                ap_axis.plot(iterations, values, style, color=colour, marker="o", markersize=4,
                             label=f"{run.label} {key}")
    ap_axis.set(title="COCO AP per evaluation (AP50 dashed)", xlabel="iteration", ylabel="AP")
    ap_axis.grid(alpha=0.3)
    if not any(run.eval for run in runs):
        ap_axis.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ap_axis.transAxes)
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_path, dpi=100)
    return output_path


def summary_lines(runs: list) -> list:
    """One line per run: iterations, last loss, last and best AP."""
    lines = []
    for run in runs:
        _, losses = run.series("loss")
        ap_iterations, aps = run.series("AP", "eval")
        best = max(range(len(aps)), key=aps.__getitem__) if aps else None
        lines.append(f"{run.label}: {run.train[-1]['iteration'] if run.train else 0} iterations, "
                     f"last loss {losses[-1]:.4f}" if losses else f"{run.label}: no training record")
        if aps:
            lines[-1] += f", last AP {aps[-1]:.4f}, best AP {aps[best]:.4f} at iteration {ap_iterations[best]}"
    return lines
