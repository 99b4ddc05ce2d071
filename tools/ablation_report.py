"""What tools/ablate.py writes: ``ablation.md`` (a table in the layout of the paper's Table 1),
``ablation.json`` (every cell's settings, command, metrics and speed) and ``ablation.png``.

A run record (``cell.json`` in the run's folder) holds: ``label``, ``settings`` (the
grid's values), ``status`` ("running" | "done" | "failed"), ``metrics`` (the 12 COCO figures as
fractions, None where the split has no ground truth for one), ``iterations``,
``train_images_per_s``, ``inference_ms_per_image``, ``command``, ``error`` when failed, and
``seed`` when the grid runs several seeds.

With one run per cell the table lists each cell's figures. With seeds (``grid["seeds"]``) a
cell is ``{"label", "settings", "runs": [run records], "stats": ...}`` (``stats`` from
``ablation_stats.cell_statistics``) and the table gives mean +- std over the seeds, the 95 %
interval of the mean AP and every cell's paired difference to ``grid["baseline"]``.
"""
import logging
from pathlib import Path

from utils.runtime.atomic_io import atomic_write, write_json_atomic
from utils.visual.plotting import figure_class

logger = logging.getLogger("ablate")

COLUMNS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SIGNIFICANT = "*"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _number(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _status_note(cell: dict) -> str:
    status = cell.get("status")
    return {"failed": f"failed: {cell.get('error', '?')}",
            "running": "interrupted: run the same command to resume"}.get(status, "not run yet")


def markdown_table(cells: list) -> str:
    """One row per cell, in grid order; a cell not run yet or failed says so in its row."""
    header = ["setting", *COLUMNS, "iterations", "train img/s", "ms/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for cell in cells:
        if cell.get("status") == "done":
            metrics = cell["metrics"]
            values = [_percent(metrics.get(k)) for k in COLUMNS]
            values += [str(cell.get("iterations", "n/a")), _number(cell.get("train_images_per_s")),
                       _number(cell.get("inference_ms_per_image"))]
        else:
            values = [_status_note(cell)] + [""] * (len(header) - 2)
        lines.append("| " + " | ".join([cell["label"], *values]).replace("\n", " ") + " |")
    return "\n".join(lines)


def _interval(ci) -> str:
    return "-" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def mean_std(entry: dict) -> str:
    """``29.1 ± 0.8`` in AP points; ``29.1 ± -`` from one seed, ``n/a`` from none."""
    if entry["mean"] is None:
        return "n/a"
    spread = "-" if entry["std"] is None else f"{100 * entry['std']:.1f}"
    return f"{100 * entry['mean']:.1f} ± {spread}"


def paired_text(paired) -> str:
    """``-4.1 [-6.0, -2.2] *``: the mean paired difference, its interval and the mark when it excludes 0."""
    if paired is None:
        return "baseline"
    if paired["mean"] is None:
        return "n/a"
    mark = f" {SIGNIFICANT}" if paired["significant"] else ""
    return f"{100 * paired['mean']:+.1f} {_interval(paired['ci'])}{mark}"


def seeded_tables(cells: list) -> str:
    """Mean ± std per cell, then the paired differences of every metric to the baseline."""
    header = ["setting", "seeds", *COLUMNS, "AP 95 % CI", "ΔAP to baseline (95 % CI)", "train img/s", "ms/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for cell in cells:
        stats = cell["stats"]
        if not stats["AP"]["n"]:
            values = [_status_note(cell)] + [""] * (len(header) - 2)
        else:
            values = [str(stats["AP"]["n"]), *(mean_std(stats[k]) for k in COLUMNS), _interval(stats["AP"]["ci"]),
                      paired_text(stats["AP"]["paired"]), _number(cell.get("train_images_per_s")),
                      _number(cell.get("inference_ms_per_image"))]
        lines.append("| " + " | ".join([cell["label"], *values]).replace("\n", " ") + " |")
    lines += ["", "Paired differences to the baseline, cell minus baseline seed by seed (AP points, mean and 95 % "
              f"CI over the seeds both finished; {SIGNIFICANT} = the interval excludes 0):", ""]
    header = ["setting", "paired seeds", *(f"Δ{k}" for k in COLUMNS)]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for cell in cells:
        paired = cell["stats"]["AP"]["paired"]
        lines.append("| " + " | ".join([cell["label"], "-" if paired is None else str(paired["n"]),
                                        *(paired_text(cell["stats"][k]["paired"]) for k in COLUMNS)]) + " |")
    problems = [f"- {cell['label']}, seed {run['seed']}: {_status_note(run)}" for cell in cells
                for run in cell["runs"] if run.get("status") != "done"]
    return "\n".join(lines + ([""] + problems if problems else []))


def write_report(output_dir: Path, grid: dict, cells: list) -> None:
    """``grid``: ``name``, ``description``, ``command``, ``iters``, ``common_args`` (what every cell shares);
    with seeds also ``seeds`` and ``baseline``; ``anchor_balance`` (a line) when it was measured."""
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "ablation.json", {**grid, "cells": cells})
    seeds = grid.get("seeds")
    if seeds:
        done = sum(run.get("status") == "done" for cell in cells for run in cell["runs"])
        every_cell = (f"Every cell: the same data and budget of {grid['iters']} iterations (`train.py --iters`), "
                      f"trained once per seed ({', '.join(map(str, seeds))}: `train.py --seed`, which sets the "
                      f"initialisation, the data order and the augmentation), then COCO AP (pycocotools) on the "
                      f"validation split. AP figures in points: mean ± sample std over the seeds; AP 95 % CI: "
                      f"mean ± t(n-1) · std / √n. Baseline: {grid['baseline']}. train img/s: median training "
                      f"throughput over the seeds; ms/img: inference at batch 1 (pre- and post-processing "
                      f"included, median), timed on the first seed's model only.")
        table, count = seeded_tables(cells), f"{done} of {len(cells) * len(seeds)} runs ({len(cells)} cells x " \
                                             f"{len(seeds)} seeds) done."
    else:
        every_cell = (f"Every cell: the same data, seed and budget of {grid['iters']} iterations (`train.py --iters`), "
                      f"then COCO AP (pycocotools) on the validation split. AP figures in %. train img/s: median "
                      f"training throughput; ms/img: inference at batch 1, pre- and post-processing included "
                      f"(median).")
        done = sum(cell.get("status") == "done" for cell in cells)
        table, count = markdown_table(cells), f"{done} of {len(cells)} cells done."
    balance = [f"Data: {grid['anchor_balance']}.", ""] if grid.get("anchor_balance") else []
    text = "\n".join([
        f"# Ablation: {grid['name']}", "", grid["description"], "",
        f"Command: `{grid['command']}`", "", every_cell, "",
        f"Common train.py flags: `{' '.join(grid['common_args']) or '(recipe defaults)'}`", "",
        *balance, table, "", count, ""])
    atomic_write(output_dir / "ablation.md", lambda f: f.write(text), binary=False)
    plot_ablation(output_dir / "ablation.png", grid, cells)


def _plotted(grid: dict, cells: list) -> list:
    """(label, AP, AP50, AP std, AP50 std, ms/img) in % of the cells with an AP; std None without seeds."""
    rows = []
    for cell in cells:
        if grid.get("seeds"):
            stats = cell["stats"]
            if stats["AP"]["mean"] is None:
                continue
            rows.append((cell["label"], 100 * stats["AP"]["mean"], 100 * (stats["AP50"]["mean"] or 0),
                         100 * (stats["AP"]["std"] or 0), 100 * (stats["AP50"]["std"] or 0),
                         cell.get("inference_ms_per_image")))
        elif cell.get("status") == "done" and cell["metrics"].get("AP") is not None:
            rows.append((cell["label"], 100 * cell["metrics"]["AP"], 100 * (cell["metrics"].get("AP50") or 0),
                         None, None, cell["inference_ms_per_image"]))
    return rows


def plot_ablation(path: Path, grid: dict, cells: list) -> bool:
    """AP (and AP50) per setting as bars; for the scale grid AP against ms per image, as in the
    paper's Figure 2. With seeds: the means, with error bars of ± 1 sample std over the seeds.
    Returns False (with a warning) when matplotlib is missing."""
    try:
        Figure = figure_class("the ablation plot")
    except ImportError as exc:
        logger.warning("%s; skipping %s", exc, path.name)
        return False
    rows = _plotted(grid, cells)
    if not rows:
        return False
    seeds = grid.get("seeds")
    bars = f"mean of {len(seeds)} seeds, error bars ± 1 std" if seeds else None
    labels, aps, ap50s, ap_stds, ap50_stds, times = zip(*rows)
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(rows)) if grid["name"] != "scale" else (6, 4.5))
    ax = fig.add_subplot()
    if grid["name"] == "scale":
        if seeds:
            ax.errorbar(times, aps, yerr=ap_stds, marker="o", capsize=3)
        else:
            ax.plot(times, aps, marker="o")
        for label, x, y in zip(labels, times, aps):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        ax.set(xlabel="inference time (ms / image)", ylabel="COCO AP (%)",
               title="speed / accuracy" + (f" ({bars})" if bars else ""))
    else:
        positions = range(len(rows))[::-1]
        ax.barh([p + 0.2 for p in positions], aps, height=0.4, label="AP", xerr=ap_stds if seeds else None,
                capsize=2)
        ax.barh([p - 0.2 for p in positions], ap50s, height=0.4, label="AP50", xerr=ap50_stds if seeds else None,
                capsize=2)
        ax.set_yticks(list(positions), list(labels), fontsize="small")
        title = f"ablation: {grid['name']} ({grid['iters']} iterations each)"
        ax.set(xlabel="COCO AP (%)", title=title + (f"\n{bars}" if bars else ""))
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True
