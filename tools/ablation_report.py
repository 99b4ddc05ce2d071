"""What tools/ablate.py writes: ``ablation.md`` (a table in the layout of the paper's Table 1),
``ablation.json`` (every cell's settings, command, metrics and speed) and ``ablation.png``.

A cell record (``cell.json`` in the cell's folder) holds: ``label``, ``settings`` (the
grid's values), ``status`` ("running" | "done" | "failed"), ``metrics`` (the 12 COCO figures as
fractions, None where the split has no ground truth for one), ``iterations``,
``train_images_per_s``, ``inference_ms_per_image``, ``command``, and ``error`` when failed.
"""
import logging
from pathlib import Path

from utils.runtime.atomic_io import atomic_write, write_json_atomic
from utils.visual.plotting import figure_class

logger = logging.getLogger("ablate")

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _number(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(cells: list) -> str:
    """One row per cell, in grid order; a cell not run yet or failed says so in its row."""
    header = ["setting", *COLUMNS, "iterations", "train img/s", "ms/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for cell in cells:
        status = cell.get("status")
        if status == "done":
            metrics = cell["metrics"]
            values = [_percent(metrics.get(k)) for k in COLUMNS]
            values += [str(cell.get("iterations", "n/a")), _number(cell.get("train_images_per_s")),
                       _number(cell.get("inference_ms_per_image"))]
        else:
            note = {"failed": f"failed: {cell.get('error', '?')}",
                    "running": "interrupted: run the same command to resume"}.get(status, "not run yet")
            values = [note] + [""] * (len(header) - 2)
        lines.append("| " + " | ".join([cell["label"], *values]).replace("\n", " ") + " |")
    return "\n".join(lines)


def write_report(output_dir: Path, grid: dict, cells: list) -> None:
    """``grid``: ``name``, ``description``, ``command``, ``iters``, ``common_args`` (what every cell shares)."""
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "ablation.json", {**grid, "cells": cells})
    done = sum(cell.get("status") == "done" for cell in cells)
    text = "\n".join([
        f"# Ablation: {grid['name']}", "", grid["description"], "",
        f"Command: `{grid['command']}`", "",
        f"Every cell: the same data, seed and budget of {grid['iters']} iterations (`train.py --iters`), then "
        f"COCO AP (pycocotools) on the validation split. AP figures in %. train img/s: median training "
        f"throughput; ms/img: inference at batch 1, pre- and post-processing included (median).", "",
        f"Common train.py flags: `{' '.join(grid['common_args']) or '(recipe defaults)'}`", "",
        markdown_table(cells), "", f"{done} of {len(cells)} cells done.", ""])
    atomic_write(output_dir / "ablation.md", lambda f: f.write(text), binary=False)
    plot_ablation(output_dir / "ablation.png", grid, cells)


def plot_ablation(path: Path, grid: dict, cells: list) -> bool:
    """AP (and AP50) per setting as bars; for the scale grid AP against ms per image, as in the
    paper's Figure 2. Returns False (with a warning) when matplotlib is missing."""
    try:
        Figure = figure_class("the ablation plot")
    except ImportError as exc:
        logger.warning("%s; skipping %s", exc, path.name)
        return False
    done = [cell for cell in cells if cell.get("status") == "done" and cell["metrics"].get("AP") is not None]
    if not done:
        return False
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(done)) if grid["name"] != "scale" else (6, 4.5))
    ax = fig.add_subplot()
    if grid["name"] == "scale":
        times = [cell["inference_ms_per_image"] for cell in done]
        aps = [100 * cell["metrics"]["AP"] for cell in done]
        ax.plot(times, aps, marker="o")
        for cell, x, y in zip(done, times, aps):
            ax.annotate(cell["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        ax.set(xlabel="inference time (ms / image)", ylabel="COCO AP (%)", title="speed / accuracy")
    else:
        positions = range(len(done))[::-1]
        ax.barh([p + 0.2 for p in positions], [100 * cell["metrics"]["AP"] for cell in done], height=0.4,
                label="AP")
        ax.barh([p - 0.2 for p in positions], [100 * (cell["metrics"].get("AP50") or 0) for cell in done],
                height=0.4, label="AP50")
        ax.set_yticks(list(positions), [cell["label"] for cell in done], fontsize="small")
        ax.set(xlabel="COCO AP (%)", title=f"ablation: {grid['name']} ({grid['iters']} iterations each)")
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True
