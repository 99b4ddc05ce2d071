"""The paper's Figure 1: the focal loss against the probability of the ground-truth class.

    python tools/plot_focal_loss.py                                 # output/figures/figure1_focal_loss.png
    python tools/plot_focal_loss.py --gammas 0 0.5 1 2 5 --output fig1.png

The curves are computed by ``losses/focal_loss.py`` (the paper's formula, which the fused
kernel the detector trains with, ``ops/fused_focal_loss.py``, is tested equal to): for a positive example the model's probability p_t of the
ground-truth class is sigmoid(x), so the loss at p_t is ``sigmoid_focal_loss(logit(p_t), 1)``
without alpha weighting, as in the figure. gamma = 0 is the cross-entropy. Beside the PNG, a
JSON file holds the plotted numbers.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses.focal_loss import sigmoid_focal_loss  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.errors import ConfigError, exit_on_user_error  # noqa: E402
from utils.visual.plotting import figure_class  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Figure 1: focal loss against p_t",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0, 0.5, 1, 2, 5], help="focusing parameters")
    parser.add_argument("--output", default="output/figures/figure1_focal_loss.png",
                        help="PNG to write (the numbers go beside it as .json)")
    parser.add_argument("--points", type=int, default=400, help="p_t values between 0 and 1")
    return parser


def focal_loss_curves(gammas, points: int = 400) -> dict:
    """``{"p_t": [...], "loss": {gamma: [...]}}``: the loss of one positive example at each p_t."""
    p_t = torch.linspace(0, 1, points + 2, dtype=torch.float64)[1:-1]  # open interval: log(0) is infinite
    logits = torch.log(p_t) - torch.log1p(-p_t)
    targets = torch.ones_like(p_t)
    curves = {gamma: sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma).tolist() for gamma in gammas}
    return {"p_t": p_t.tolist(), "loss": curves}


def plot(curves: dict, path: Path) -> None:
    Figure = figure_class("tools/plot_focal_loss.py")
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for gamma, loss in curves["loss"].items():
        ax.plot(curves["p_t"], loss, label=f"$\\gamma$ = {gamma:g}" + (" (CE)" if gamma == 0 else ""))
    ax.axvspan(0.6, 1.0, color="0.92", zorder=0)
    ax.text(0.8, 4.6, "well-classified\nexamples", ha="center", va="top", fontsize="small")
    ax.set(xlabel="probability of ground truth class $p_t$", ylabel="loss", xlim=(0, 1), ylim=(0, 5),
           title="FL$(p_t) = -(1 - p_t)^\\gamma \\log(p_t)$")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.8), fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(args) -> Path:
    if args.points < 2:
        raise ConfigError(f"--points {args.points}: need at least 2")
    if any(gamma < 0 for gamma in args.gammas):
        raise ConfigError(f"--gammas {args.gammas}: gamma must be >= 0")
    figure_class("tools/plot_focal_loss.py")  # fail before any work if matplotlib is missing
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    curves = focal_loss_curves(args.gammas, args.points)
    plot(curves, path)
    write_json_atomic(path.with_suffix(".json"), {"p_t": curves["p_t"], "loss": {
        f"{gamma:g}": values for gamma, values in curves["loss"].items()}}, compact=True)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return path


if __name__ == "__main__":
    exit_on_user_error(main, get_args_parser().parse_args())
