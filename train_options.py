"""train.py's command line: every option, its --help text and the value each recipe gives it.

Every option defaults to None (= not given), so that :func:`recipes.resolve_config` can tell a
value the user typed from the recipe's and the defaults; tools that take train.py's options
(``tools/ablate.py``, ``tools/check_dataset.py``) build on :func:`get_args_parser`.
"""
import argparse

from model.backbone import BACKBONES
from model.config import CLS_LOSSES, ModelConfig
from recipes import MODEL_FIELDS, RECIPES, TrainConfig, show_value
from utils.runtime.device import AMP_CHOICES


def option_help(name: str, text: str) -> str:
    """``text`` plus the value each recipe gives ``name``, or its default, for --help."""
    in_recipes = {recipe: values[name] for recipe, values in RECIPES.items() if name in values}
    if in_recipes:
        shown = ", ".join(f"{recipe}: {show_value(value)}" for recipe, value in in_recipes.items())
        return f"{text} ({shown})"
    default = getattr(TrainConfig, name, None)
    if default is None and name in MODEL_FIELDS:
        default = getattr(ModelConfig, name)
    return f"{text} (default: {show_value(default)})" if default is not None else text


def get_args_parser() -> argparse.ArgumentParser:
    """train.py's command line; tools that take its options build on it (tools/check_dataset.py).

    Every option defaults to None (= not given): the recipe and the defaults fill it in (:func:`resolve_config`).
    """
    parser = argparse.ArgumentParser("RetinaNet training", description="Options not given take the recipe's value "
                                     "(--recipe coco|demo|large, see recipes.py), else the default shown.")
    _add_data_options(parser.add_argument_group("data"))
    _add_model_options(parser.add_argument_group("model"))
    _add_optimisation_options(parser.add_argument_group("optimisation"))
    _add_runtime_options(parser.add_argument_group("runtime"))
    return parser


def _add_data_options(group) -> None:
    group.add_argument("--recipe", choices=sorted(RECIPES), help="coco: the paper's 1x schedule (default with "
                       "--data-path); demo: from scratch, CPU-friendly (default without); large: the demo's detector "
                       "on 256 px windows of a few large images at native resolution, with flips, rotations and "
                       "colour jitter (needs --data-path)")
    group.add_argument("--data-path", help="COCO-format ROOT (annotations/instances_SPLIT.json + SPLIT/ images); "
                       "omit to generate and train on the built-in demo dataset")
    group.add_argument("--demo-scale", type=float, metavar="F", help="the built-in demo at F times its size "
                       "(0 < F <= 1): F x its images, so F x the iterations, and F x its warm-up, in data/demo-F "
                       "and output/demo-F; e.g. 0.01 (30 + 3 images, 16 iterations) to check quickly that all "
                       "runs (default: 1)")
    group.add_argument("--train-split", help=option_help("train_split", "training split name"))
    group.add_argument("--val-split", help=option_help("val_split", "validation split name"))
    group.add_argument("--filter-empty", action="store_true", default=None, help="drop training images without boxes")
    group.add_argument("--no-aspect-ratio-grouping", dest="aspect_ratio_grouping", action="store_false", default=None,
                       help="mix wide and tall images in a batch")
    group.add_argument("--hflip-prob", type=float, help=option_help("hflip_prob", "horizontal flip probability"))
    group.add_argument("--vflip-prob", type=float, help=option_help(
        "vflip_prob", "vertical flip probability (top-down imagery, slides: no 'up')"))
    group.add_argument("--rot90-prob", type=float, help=option_help(
        "rot90_prob", "probability of rotating by k x 90 degrees, k uniform in 1, 2, 3"))
    group.add_argument("--colour-jitter", type=float, metavar="F", help=option_help(
        "colour_jitter", "brightness, contrast and saturation factors drawn from [1 - F, 1 + F] per image"))
    group.add_argument("--crop-size", type=int, metavar="N", help=option_help(
        "crop_size", "train on random N x N windows of the images scaled by --crop-scale instead of whole "
        "images (large images, small objects; min and max size become N; 0 = whole images); inference and "
        "evaluation then tile whole images with such windows"))
    group.add_argument("--crop-scale", "--scale", dest="crop_scale", type=float, metavar="S", help=option_help(
        "crop_scale", "with --crop-size: the images' scale before cropping (1 = native resolution, 0.5 = half)"))
    group.add_argument("--min-visible", type=float, metavar="F", help=option_help(
        "min_visible", "with --crop-size: a box cut by the window stays a box when at least this share of its "
        "area is inside, else its visible part is ignored (neither object nor background)"))
    group.add_argument("--crop-object-prob", type=float, metavar="P", help=option_help(
        "crop_object_prob", "with --crop-size: probability of placing a window on a random object's centre "
        "(else anywhere in the image)"))
    group.add_argument("--scale-jitter", type=float, nargs=2, metavar=("LO", "HI"), help="with --crop-size: "
                       "multiply each window's scale by a factor drawn log-uniformly from [LO, HI] (default: none)")
    group.add_argument("--crop-cache-mb", type=int, metavar="MB", help=option_help(
        "crop_cache_mb", "with --crop-size: MiB of decoded images kept between the windows cut from them, per "
        "data-loading process (each of --workers, each rank); 0 = decode the image again for every window"))
    group.add_argument("--workers", type=int, help=option_help("workers", "data loading processes per GPU"))
    group.add_argument("--max-bad-images", type=float, help="stop when more unreadable images than this were "
                       "skipped: a fraction of the dataset if < 1, else a count (default: 0.1 %%, at least 10)")


def _add_model_options(group) -> None:
    group.add_argument("--weights", help="fine-tune from detection weights: one of our checkpoints, a torchvision "
                       "RetinaNet state-dict file or weights name (RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1); the "
                       "architecture follows the weights (an architecture flag that contradicts them is an error), "
                       "every tensor but the last classifier layer is loaded, classifier rows of categories whose "
                       "names match are kept")
    group.add_argument("--backbone", choices=sorted(BACKBONES), help=option_help("backbone", "trunk"))
    group.add_argument("--pretrained-backbone", help=option_help(
        "pretrained_backbone", "ImageNet weights: torchvision tag (DEFAULT, IMAGENET1K_V1), a .pth path, or 'none'"))
    group.add_argument("--trainable-backbone-layers", type=int,
                       help=option_help("trainable_backbone_layers", "stages trained with frozen BN (0-5)"))
    group.add_argument("--fpn-channels", type=int, help=option_help("fpn_channels", "FPN and head width"))
    group.add_argument("--num-extra-levels", type=int, help=option_help("num_extra_levels", "2 = P6+P7, 0 = P3-P5"))
    group.add_argument("--anchor-base-sizes", type=int, nargs="+",
                       help=option_help("anchor_base_sizes", "anchor size per level"))
    group.add_argument("--p6-from", choices=["c5", "p5"], help=option_help("p6_from", "P6 input"))
    group.add_argument("--head-convs", type=int, help=option_help("head_convs", "convs per head tower"))
    group.add_argument("--head-norm", choices=["none", "gn"], help=option_help("head_norm", "head tower normalisation"))
    group.add_argument("--min-size", type=int, nargs="+",
                       help=option_help("min_size", "shorter side; several values = multi-scale training"))
    group.add_argument("--max-size", type=int, help=option_help("max_size", "longer side cap"))
    group.add_argument("--box-loss", choices=["smooth_l1", "l1", "giou"], help=option_help("box_loss", "box loss"))
    # The paper's Table 1 knobs (docs/reproducing_the_paper.md; tools/ablate.py runs the grids).
    group.add_argument("--cls-loss", dest="cls_loss", choices=list(CLS_LOSSES), help=option_help(
        "cls_loss", "classification loss: focal (eq. 5); ce: sigmoid cross-entropy, no alpha; balanced-ce: "
        "alpha-balanced CE (eq. 3, --focal-alpha); ohem: CE over the hardest anchors per image (--ohem-*)"))
    group.add_argument("--focal-gamma", dest="focal_gamma", type=float,
                       help=option_help("focal_gamma", "focusing parameter"))
    group.add_argument("--focal-alpha", dest="focal_alpha", type=float, help=option_help(
        "focal_alpha", "weight of the foreground terms (focal, balanced-ce); negative = none"))
    group.add_argument("--prior-prob", dest="prior_prob", type=float, help=option_help(
        "prior_prob", "initial foreground probability pi of the classifier (0 = bias 0, no prior; with CE the "
        "paper reports divergence)"))
    group.add_argument("--scales-per-octave", dest="scales_per_octave", type=int,
                       help=option_help("scales_per_octave", "anchor scales per level: 2^(k/n), k = 0..n-1"))
    group.add_argument("--aspect-ratios", dest="aspect_ratios", type=float, nargs="+",
                       help=option_help("aspect_ratios", "anchor aspect ratios (height / width)"))
    group.add_argument("--fg-iou-thresh", dest="fg_iou_thresh", type=float,
                       help=option_help("fg_iou_thresh", "anchor IoU at or above which it is foreground"))
    group.add_argument("--bg-iou-thresh", dest="bg_iou_thresh", type=float, help=option_help(
        "bg_iou_thresh", "anchor IoU below which it is background (in between: ignored)"))
    group.add_argument("--smooth-l1-beta", dest="smooth_l1_beta", type=float,
                       help=option_help("smooth_l1_beta", "smooth L1 transition point (0 = L1)"))
    group.add_argument("--ohem-batch", dest="ohem_batch", type=int,
                       help=option_help("ohem_batch", "--cls-loss ohem: anchors kept per image"))
    group.add_argument("--ohem-nms-thresh", dest="ohem_nms_thresh", type=float, help=option_help(
        "ohem_nms_thresh", "--cls-loss ohem: NMS IoU over the anchors' boxes (1 = no NMS)"))
    group.add_argument("--ohem-fg-ratio", dest="ohem_fg_ratio", type=float,
                       help="--cls-loss ohem: at most this share of the kept anchors is foreground, e.g. 0.25 for "
                            "the paper's 1:3 (default: no cap)")
    group.add_argument("--sync-bn", action="store_true", default=None,
                       help="SyncBatchNorm for a trainable-BN backbone under DDP")


def _add_optimisation_options(group) -> None:
    group.add_argument("--batch-size", type=int, help=option_help("batch_size", "total batch over all GPUs"))
    group.add_argument("--optimizer", choices=["sgd", "adamw"], help=option_help("optimizer", "optimizer"))
    group.add_argument("--lr", type=float, help=option_help("lr", "learning rate at --batch-size; SGD: 0.01 x "
                                                            "batch/16 (linear scaling), AdamW: 1e-4 x batch/16"))
    group.add_argument("--momentum", type=float, help=option_help("momentum", "SGD momentum"))
    group.add_argument("--weight-decay", type=float, help=option_help("weight_decay", "weight decay"))
    group.add_argument("--epochs", type=int,
                       help="training epochs (default: from --schedule; 1x: 12, 3x: 36; demo: 4)")
    group.add_argument("--iters", type=int, help="instead of --epochs, the schedule's length in iterations: warmup, "
                       "decay steps (scaled from the schedule's epochs) and cosine run over N iterations, then the "
                       "final checkpoint and evaluation; results then depend on N alone, not on the dataset size "
                       "(tools/ablate.py). Unlike --max-iters, which only stops a run")
    group.add_argument("--schedule", choices=["1x", "3x", "steps", "cosine"], help=option_help(
        "schedule", "1x: 12 ep, x0.1 at 8 and 11; 3x: 36 ep, at 27 and 33; steps: --lr-steps"))
    group.add_argument("--lr-steps", type=int, nargs="+", help="epochs of x0.1 decay (--schedule steps)")
    group.add_argument("--warmup-iters", type=int, help=option_help("warmup_iters", "linear warmup iterations"))
    group.add_argument("--warmup-factor", type=float, help=option_help("warmup_factor", "warmup starts at lr x this"))
    group.add_argument("--clip-grad-norm", type=float,
                       help=option_help("clip_grad_norm", "max gradient norm (0 = off)"))


def _add_runtime_options(group) -> None:
    group.add_argument("--device", help=option_help("device", "auto (this rank's GPU if CUDA is there, else cpu), "
                                                              "cuda, cpu"))
    group.add_argument("--amp", choices=AMP_CHOICES,
                       help=option_help("amp", "mixed precision (auto: fp16 on CUDA, bf16 on CPU)"))
    group.add_argument("--amp-check", choices=["on", "off"], help=option_help(
        "amp_check", "with --amp: compare the first batch's loss under autocast with fp32 and warn, naming the "
        "difference, past 5 %% (utils/training/amp_check.py)"))
    group.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile backbone, FPN, heads and the dense loss (GPU runs at a fixed size; "
                            "the first iterations compile)")
    group.add_argument("--seed", type=int, help=option_help("seed", "random seed (each rank uses seed + rank)"))
    group.add_argument("--output-dir", help=option_help("output_dir", "checkpoints and logs"))
    group.add_argument("--resume", help="checkpoint path, or 'auto' for the newest valid one in --output-dir")
    group.add_argument("--eval-interval", type=int,
                       help=option_help("eval_interval", "evaluate every N epochs (0 = at the end)"))
    group.add_argument("--eval-only", action="store_true", default=None,
                       help="evaluate the resumed weights and exit")
    group.add_argument("--checkpoint-every", type=int,
                       help=option_help("checkpoint_every", "also checkpoint every N iterations (0 = only per "
                                        "epoch); epochs shorter than N then skip their own"))
    group.add_argument("--keep-checkpoints", type=int,
                       help=option_help("keep_checkpoints", "training checkpoints kept on disk"))
    group.add_argument("--max-iters", type=int,
                       help=option_help("max_iters", "stop after this many iterations (0 = no limit)"))
    group.add_argument("--max-non-finite", type=int, help=option_help(
        "max_non_finite", "stop after this many non-finite losses in a row (each is skipped)"))
    group.add_argument("--print-freq", type=int, help=option_help("print_freq", "log every N iterations"))
    group.add_argument("--num-threads", type=int,
                       help=option_help("num_threads", "CPU threads for torch (0 = torch default)"))
