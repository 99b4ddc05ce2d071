"""What the feature pyramid sees: P3-P7 per level, the classification heatmap, the anchors that fire.

    python tools/show_features.py --checkpoint output/demo/model_final.pth --image data/demo/val/000000.jpg
    python tools/show_features.py --weights RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1 --image photo.jpg

One PNG (default ``features.png``): the input with the final detections on top, then one row
per pyramid level: the channel-mean activation of P_l, the classification heatmap (the
highest class probability over the anchors of each location) and the image with that level's
anchors whose score passes ``--score-thresh``. Small objects fire on P3, large ones on P6/P7:
the scale assignment that FPN gives RetinaNet. The numbers per level go to a JSON file beside it.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.weights import load_detector  # noqa: E402
from utils.data.image_io import ImageReadError, read_image  # noqa: E402
from utils.runtime.atomic_io import write_json_atomic  # noqa: E402
from utils.runtime.errors import UserError, exit_on_user_error  # noqa: E402
from utils.visual.plotting import figure_class  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Show the FPN levels of a RetinaNet",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="one of our checkpoints (model_final.pth)")
    source.add_argument("--weights", help="or a torchvision RetinaNet state-dict file or weights name")
    parser.add_argument("--image", required=True, help="the image to look at")
    parser.add_argument("--output", default="features.png", help="PNG to write (numbers beside it as .json)")
    parser.add_argument("--score-thresh", type=float, default=0.3,
                        help="anchors and detections drawn: class probability above this")
    parser.add_argument("--max-anchors", type=int, default=30, help="at most this many anchors drawn per level")
    return parser


@torch.no_grad()
def pyramid_views(model, image: torch.Tensor, score_thresh: float) -> dict:
    """Run ``model`` (eval mode) on one ``[3, H, W]`` image, keeping what each level computes.

    Returns ``image`` (the resized input, ``[h, w, 3]`` float in [0, 1]), ``detections`` (the
    model's own output for that resized image) and per level, over the locations that cover the
    image (not the batch padding): ``feature`` (channel mean, ``[H_l, W_l]``), ``heatmap`` (max
    class probability per location, ``[H_l, W_l]``), ``stride``,
    ``anchors`` (``[N, 4]`` xyxy in resized pixels, highest score first) and ``scores``; anchors
    and detections are those scoring above ``score_thresh``.
    """
    batch, image_sizes, _ = model.transform([image])
    height, width = image_sizes[0]
    features = model.fpn(model.backbone(batch))
    cls_per_level, _ = model.head.per_level(features)
    feature_sizes = [tuple(f.shape[-2:]) for f in features]
    anchors = model.anchor_generator(tuple(batch.shape[-2:]), feature_sizes, torch.float32, batch.device)
    anchors_per_level = anchors.split(model.anchor_generator.num_anchors_per_level(feature_sizes))
    levels = []
    for feature, logits, level_anchors in zip(features, cls_per_level, anchors_per_level):
        rows, cols = feature.shape[-2:]
        stride = batch.shape[-1] // cols
        # Only the locations over the image, not over the batch's zero padding.
        inside_rows, inside_cols = -(-height // stride), -(-width // stride)
        anchor_scores = logits[0].sigmoid().amax(dim=-1).view(rows, cols, -1)  # [H_l, W_l, A]
        inside = torch.zeros_like(anchor_scores, dtype=torch.bool)
        inside[:inside_rows, :inside_cols] = True
        anchor_scores, inside = anchor_scores.reshape(-1), inside.reshape(-1)
        firing = ((anchor_scores > score_thresh) & inside).nonzero().squeeze(1)
        order = anchor_scores[firing].argsort(descending=True)
        levels.append({"feature": feature[0, :, :inside_rows, :inside_cols].mean(dim=0),
                       "heatmap": anchor_scores.view(rows, cols, -1).amax(-1)[:inside_rows, :inside_cols],
                       "stride": stride, "anchors": level_anchors[firing[order]],
                       "scores": anchor_scores[firing[order]]})
    shown = (batch[0, :, :height, :width] * model.transform.image_std + model.transform.image_mean).clamp(0, 1)
    detections = model([shown])[0]  # boxes in the frame of its input: the resized image
    keep = detections["scores"] > score_thresh
    return {"image": shown.permute(1, 2, 0), "levels": levels, "score_thresh": score_thresh,
            "detections": {key: value[keep] for key, value in detections.items()}}


def _draw_boxes(ax, boxes, colour, scores=None, categories=None, labels=None):
    from matplotlib.patches import Rectangle  # matplotlib is known to import here (figure_class ran)
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1))
        if labels is not None:
            name = categories[int(labels[i])]["name"] if categories else str(int(labels[i]))
            ax.text(x1, y1, f"{name} {float(scores[i]):.2f}", color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": colour, "pad": 0.5, "linewidth": 0})


def plot(views: dict, path: Path, categories, title: str, max_anchors: int) -> None:
    Figure = figure_class("tools/show_features.py")
    levels = views["levels"]
    fig = Figure(figsize=(9, 3 * (len(levels) + 1)))
    grid = fig.add_gridspec(len(levels) + 1, 3)
    ax = fig.add_subplot(grid[0, :])
    ax.imshow(views["image"].numpy())
    det = views["detections"]
    _draw_boxes(ax, det["boxes"], "tab:red", det["scores"], categories, det["labels"])
    ax.set_title(f"{title}: {len(det['boxes'])} detections above {views['score_thresh']:g}")
    ax.axis("off")
    for row, level in enumerate(levels, start=1):
        name = f"P{row + 2} (stride {level['stride']})"
        panels = [(level["feature"], f"{name}: mean activation", "viridis"),
                  (level["heatmap"], f"{name}: max class score", "magma")]
        for column, (values, panel_title, cmap) in enumerate(panels):
            ax = fig.add_subplot(grid[row, column])
            shown = ax.imshow(values.numpy(), cmap=cmap, **({"vmin": 0, "vmax": 1} if column == 1 else {}))
            fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(panel_title, fontsize="small")
            ax.axis("off")
        ax = fig.add_subplot(grid[row, 2])
        ax.imshow(views["image"].numpy())
        _draw_boxes(ax, level["anchors"][:max_anchors], "tab:cyan")
        ax.set_title(f"{name}: {len(level['anchors'])} anchors fire", fontsize="small")
        ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(args) -> Path:
    figure_class("tools/show_features.py")  # fail before any work if matplotlib is missing
    spec = args.checkpoint or args.weights
    model, categories = load_detector(spec, what="checkpoint" if args.checkpoint else "weights file")
    try:
        image = read_image(args.image)
    except ImageReadError as exc:
        raise UserError(str(exc)) from None
    views = pyramid_views(model.eval(), image, args.score_thresh)
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(views, path, categories, Path(args.image).name, args.max_anchors)
    summary = {"image": args.image, "model": spec, "score_thresh": args.score_thresh, "levels": [
        {"level": f"P{i + 3}", "stride": level["stride"], "size": list(level["feature"].shape),
         "max_score": float(level["heatmap"].max()), "anchors_firing": len(level["anchors"]),
         "top_anchors": [[round(v, 1) for v in box] for box in level["anchors"][:args.max_anchors].tolist()]}
        for i, level in enumerate(views["levels"])],
        "detections": len(views["detections"]["boxes"])}
    write_json_atomic(path.with_suffix(".json"), summary)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return path


if __name__ == "__main__":
    exit_on_user_error(main, get_args_parser().parse_args())
