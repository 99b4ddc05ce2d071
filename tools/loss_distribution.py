"""The paper's Figure 4: how a trained model's loss is spread over its positive and its negative
anchors, for several gamma.

    python tools/loss_distribution.py --checkpoint output/demo/model_final.pth
    python tools/loss_distribution.py --checkpoint model_final.pth --data-path /data/coco --split val2017 \\
        --max-images 500 --gammas 0 0.5 1 2

Every anchor of the first ``--max-images`` images of a split is matched as in training (IoU
>= fg_iou_thresh positive, < bg_iou_thresh negative, in between and crowd regions ignored),
and its loss, summed over the classes, is computed from the model's logits at each gamma by
``losses/focal_loss.py`` (no alpha weighting: a constant weight would cancel in the
normalisation). Per gamma, the positives' losses and the negatives' losses are each sorted,
normalised to sum to 1 and accumulated: the curve at x is the share of the loss that the
easiest fraction x of the examples carries. The paper (Section 5.1, "Analysis of the Focal
Loss") finds the positives' curves close together, while for the negatives gamma = 2 puts
nearly all of the loss on a small fraction of hard examples. Writes the PNG and, beside it,
a JSON file with each curve at 101 points and summary figures.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coco_dataset  # noqa: E402
from losses.focal_loss import sigmoid_focal_loss  # noqa: E402
from model.weights import load_detector, read_weights  # noqa: E402
from utils.boxes.matcher import BACKGROUND  # noqa: E402
from utils.data.image_io import ImageReadError  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.device import resolve_device  # noqa: E402
from utils.runtime.errors import ConfigError, UserError, exit_on_user_error  # noqa: E402
from utils.visual.plotting import figure_class  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Figure 4: cumulative loss of positive and negative anchors",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trained model (model_final.pth); the paper uses one trained with FL")
    source.add_argument("--weights", help="or a torchvision RetinaNet state-dict file or weights name")
    parser.add_argument("--data-path", help="COCO-format root; default: the checkpoint's")
    parser.add_argument("--split", help="split to analyse; default: the checkpoint's val_split, else val2017")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0, 0.5, 1, 2], help="gamma of each curve")
    parser.add_argument("--max-images", type=int, default=100, help="images used (the first of the split)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--output", default="loss_distribution.png", help="PNG to write (numbers beside it as .json)")
    return parser


@torch.no_grad()
def anchor_losses(model, dataset, to_model_label: torch.Tensor, gammas, max_images: int, batch_size: int,
                  device) -> dict:
    """``{gamma: (positive_losses, negative_losses)}`` as 1-D float arrays over every matched anchor."""
    collected = {gamma: ([], []) for gamma in gammas}
    count = min(max_images, len(dataset))
    for start in tqdm(range(0, count, batch_size), desc="images", unit="batch"):
        try:
            items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        except ImageReadError as exc:
            raise UserError(str(exc)) from None
        images = [image.to(device) for image, _ in items]
        targets = [{"boxes": t["boxes"].to(device), "labels": to_model_label[t["labels"]].to(device),
                    "crowd_boxes": t["crowd_boxes"].to(device)} for _, t in items]
        batch, _, targets = model.transform(images, targets)
        features = model.fpn(model.backbone(batch))
        cls_logits, _ = model.head(features)  # [B, A, K]
        anchors = model.anchor_generator(tuple(batch.shape[-2:]), [tuple(f.shape[-2:]) for f in features],
                                         torch.float32, batch.device)
        matched, _, gt_labels = model.loss.match(anchors, targets)
        positive, negative = matched >= 0, matched == BACKGROUND
        labels = gt_labels.gather(1, matched.clamp(min=0))
        one_hot = F.one_hot(labels, cls_logits.shape[-1]).to(cls_logits.dtype) * positive[..., None]
        for gamma in gammas:
            per_anchor = sigmoid_focal_loss(cls_logits, one_hot, alpha=-1, gamma=gamma).sum(-1)  # [B, A]
            collected[gamma][0].append(per_anchor[positive].cpu().numpy())
            collected[gamma][1].append(per_anchor[negative].cpu().numpy())
    return {gamma: tuple(np.concatenate(parts) if parts else np.zeros(0) for parts in pair)
            for gamma, pair in collected.items()}


def cumulative_loss(losses: np.ndarray, points: int = 101):
    """The share of the total loss carried by the easiest fraction x of the examples, at ``points``
    evenly spaced x in [0, 1]; None without examples or without loss."""
    total = float(losses.sum(dtype=np.float64))
    if losses.size == 0 or total <= 0:
        return None
    cumulative = np.concatenate([[0.0], np.cumsum(np.sort(losses).astype(np.float64)) / total])
    fractions = np.linspace(0, 1, len(cumulative))
    return np.interp(np.linspace(0, 1, points), fractions, cumulative).tolist()


def summarise(losses: np.ndarray) -> dict:
    curve = cumulative_loss(losses)
    return {"count": int(losses.size), "mean_loss": float(losses.mean()) if losses.size else None,
            # the share of the loss on the hardest 20 % / 1 % of the examples
            "hardest_20pct_share": None if curve is None else 1 - curve[80],
            "hardest_1pct_share": None if curve is None else 1 - curve[99], "cdf": curve}


def plot(summary: dict, path: Path) -> None:
    Figure = figure_class("tools/loss_distribution.py")
    fig = Figure(figsize=(11, 4.5))
    x = np.linspace(0, 1, 101)
    for column, (kind, noun) in enumerate((("positive", "foreground"), ("negative", "background")), start=1):
        ax = fig.add_subplot(1, 2, column)
        for gamma, curves in summary["gammas"].items():
            if curves[kind]["cdf"] is not None:
                ax.plot(x, curves[kind]["cdf"], label=f"$\\gamma$ = {gamma}")
        count = next(iter(summary["gammas"].values()))[kind]["count"]  # the same anchors for every gamma
        ax.set(xlabel=f"fraction of {noun} examples", ylabel="cumulative normalized loss", xlim=(0, 1),
               ylim=(0, 1), title=f"{kind} samples ({count} anchors)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(args) -> Path:
    if args.max_images < 1 or args.batch_size < 1:
        raise ConfigError("--max-images and --batch-size must be >= 1")
    if any(gamma < 0 for gamma in args.gammas):
        raise ConfigError(f"--gammas {args.gammas}: gamma must be >= 0")
    figure_class("tools/loss_distribution.py")  # fail before any work if matplotlib is missing
    spec = args.checkpoint or args.weights
    source = read_weights(spec, what="checkpoint" if args.checkpoint else "weights file")
    model, categories = load_detector(source)
    saved = source.train_args or {}
    data_path = args.data_path or saved.get("data_path")
    split = args.split or saved.get("val_split") or "val2017"
    if data_path is None:
        raise UserError(f"{spec} stores no data_path; pass --data-path")
    dataset = coco_dataset.build_dataset(data_path, split)
    # The dataset's labels follow its own category list; the model's, the one it was trained with.
    model_label = {category["id"]: k for k, category in enumerate(categories)}
    unknown = [c["id"] for c in dataset.categories if c["id"] not in model_label]
    if unknown:
        raise UserError(f"category ids {unknown} of {split} are not among {spec}'s categories; "
                        "was the model trained on another dataset?")
    to_model_label = torch.tensor([model_label[c["id"]] for c in dataset.categories], dtype=torch.long)
    device = resolve_device(args.device)
    model = model.to(device).eval()
    losses = anchor_losses(model, dataset, to_model_label, args.gammas, args.max_images, args.batch_size, device)
    summary = {"model": spec, "data_path": str(data_path), "split": split,
               "images": min(args.max_images, len(dataset)), "alpha": "none",
               "gammas": {f"{gamma:g}": {"positive": summarise(pos), "negative": summarise(neg)}
                          for gamma, (pos, neg) in losses.items()}}
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, path)
    write_json_atomic(path.with_suffix(".json"), summary)
    for gamma, curves in summary["gammas"].items():
        shares = [curves[kind]["hardest_20pct_share"] for kind in ("positive", "negative")]
        print(f"gamma {gamma}: hardest 20 % of positives carry {_share(shares[0])} of their loss, "
              f"of negatives {_share(shares[1])}")
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return path


def _share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


if __name__ == "__main__":
    exit_on_user_error(main, get_args_parser().parse_args())
