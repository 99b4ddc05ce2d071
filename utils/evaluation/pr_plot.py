"""Precision-recall curves from an evaluated ``COCOeval``, saved as PNG.

matplotlib is in requirements.txt, but scoring must not depend on it: without it the
plots are skipped with a warning, never an error, so ``evaluation.py --plot`` still scores.
"""
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from utils.visual.plotting import MatplotlibMissing, figure_class

logger = logging.getLogger(__name__)


def _curve_mean(curves: np.ndarray) -> np.ndarray:
    """Mean over categories of ``[R, K]`` precision, ignoring COCOeval's -1 (no ground truth)."""
    valid = curves > -1
    counts = valid.sum(axis=1)
    return np.where(valid, curves, 0.0).sum(axis=1) / np.maximum(counts, 1)


def plot_pr_curves(coco_eval, output_dir, category_names: Mapping[int, str] = None,
                   num_extreme: int = 3) -> list[Path]:
    """Write ``pr_all_categories.png`` and ``pr_best_worst_categories.png`` into ``output_dir``.

    - all categories: precision averaged over categories at IoU 0.50 and 0.75;
    - best / worst: the ``num_extreme`` categories with the highest and lowest AP@[.5:.95],
      each at IoU 0.50 (solid) and 0.75 (dashed).

    Curves are COCO's interpolated precision at its 101 recall points (area "all",
    maxDets=100), the same numbers AP averages. Returns the written paths; ``[]``
    when matplotlib is missing.
    """
    try:
        Figure = figure_class("evaluation.py --plot")
    except MatplotlibMissing as exc:
        logger.warning("%s. Continuing without precision-recall curves.", exc)
        return []

    params = coco_eval.params
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    recall = params.recThrs
    iou_index = {iou: int(np.argmin(np.abs(params.iouThrs - iou))) for iou in (0.5, 0.75)}
    names = [(category_names or {}).get(cat_id, str(cat_id)) for cat_id in params.catIds]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for iou, t in iou_index.items():
        ax.plot(recall, _curve_mean(precision[t]), label=f"IoU={iou:.2f}")
    _decorate(ax, "all categories (mean precision)")
    written.append(output_dir / "pr_all_categories.png")
    fig.savefig(written[-1], dpi=100, bbox_inches="tight")

    # A category without ground truth is -1 over its whole [T, R] slice, so its mean is
    # -1 and it drops out of the ranking (it has no curve to draw).
    ap = precision.mean(axis=(0, 1))  # [K]
    ranked = [k for k in np.argsort(-ap, kind="stable") if ap[k] >= 0]
    if ranked:
        fig = Figure(figsize=(12, 5))
        # With few categories, halve them so no category is both "best" and "worst".
        count = max(1, min(num_extreme, len(ranked) // 2))
        groups = (("best", ranked[:count]), ("worst", ranked[::-1][:count]))
        for column, (title, categories) in enumerate(groups, start=1):
            ax = fig.add_subplot(1, 2, column)
            for k in categories:
                line, = ax.plot(recall, precision[iou_index[0.5], :, k], label=f"{names[k]} (AP {ap[k]:.3f}) @.50")
                ax.plot(recall, precision[iou_index[0.75], :, k], linestyle="--", color=line.get_color(),
                        label=f"{names[k]} @.75")
            _decorate(ax, f"{title} {len(categories)} categories by AP")
        written.append(output_dir / "pr_best_worst_categories.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
    return written


def _decorate(ax, title: str) -> None:
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
