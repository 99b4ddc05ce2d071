"""The configuration of a RetinaNet: what it is, what it predicts, how it is trained. Frozen.

A :class:`ModelConfig` holds the architecture (trunk, pyramid, heads, anchors), the
input resolution, the post-processing and the loss settings. It travels in every
checkpoint (``ModelConfig.to_dict()`` as ``"model_config"``) and rebuilds the model on
its own. How a model *runs* (BatchNorm folding, memory layout, Winograd convs,
torch.compile) is not configuration: ``RetinaNet.optimize_for`` chooses it at run time.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from losses.retinanet_loss import CLS_LOSSES, check_loss_names  # noqa: F401  (CLS_LOSSES: train.py's --cls-loss)
from model.backbone import BACKBONES
from model.transform import IMAGENET_MEAN, IMAGENET_STD
from utils.runtime.errors import ConfigError

# Fields whose value decides tensor shapes or what the trained weights mean: with
# weights loaded, a different value given explicitly is a conflict, not an override.
ARCHITECTURE_FIELDS = ("backbone", "fpn_channels", "num_extra_levels", "p6_from", "head_convs", "head_norm",
                       "scales_per_octave", "aspect_ratios")
# Fields where weights bring their own value (torchvision v2 trains with GIoU, pads to 32, ...)
# that holds unless the user sets another explicitly.
FOLLOW_WEIGHTS_FIELDS = ARCHITECTURE_FIELDS + (
    "backbone_norm", "trainable_backbone_layers", "anchor_base_sizes", "size_divisible", "image_mean", "image_std",
    "box_loss", "bbox_reg_weights", "prior_prob")

# Keys that checkpoints written before the execution settings left the configuration
# still carry; they are dropped on load (RetinaNet.optimize_for chooses these now).
LEGACY_EXECUTION_KEYS = ("channels_last", "fold_batchnorm", "inference_channels_last", "compile_loss", "winograd",
                         "pretrained_backbone")


@dataclass(frozen=True)
class ModelConfig:
    """Defaults are the paper's COCO configuration (R-50, P3-P7, 800 px).

    Backbone:
        backbone: one of ``model.backbone.BACKBONES`` (resnet18/34/50/101/152, resnext50_32x4d,
            resnext101_32x8d); backbone_norm: "auto" (frozen BN with pretrained weights,
            trainable BN without), "frozen_bn" or "bn"; trainable_backbone_layers: stages trained
            from the top (0-5) when BatchNorm is frozen.
    Pyramid and head:
        fpn_channels (256); num_extra_levels: 2 = P6 + P7 (paper), 1 = P6, 0 = P3-P5;
        p6_from: "c5" (paper) or "p5" (torchvision v1); head_convs (4); head_norm: None or "gn";
        prior_prob: pi of the classification bias init (0.01; 0 = bias 0, no prior).
    Anchors:
        anchor_base_sizes: size on each level (32..512 for P3..P7); scales_per_octave: 3 gives
        2^0, 2^(1/3), 2^(2/3); aspect_ratios: (0.5, 1, 2).
    Input:
        min_size (int, or a tuple for multi-scale training), max_size, fixed_size (H, W) or None,
        size_divisible (pad multiple), image_mean, image_std.
    Large images (crop training and tiled inference):
        crop_size: 0 = trained on whole images resized to min_size / max_size; N > 0 = trained on
            N x N windows cut from images scaled by crop_scale (min_size = max_size = N, so the model
            does not resize a window). Inference then tiles by default: windows of
            round(N / crop_scale) pixels of the original image, each resized by the model to N x N.
        crop_scale: the factor the images were scaled by before cropping (1.0 = native resolution).
    Inference:
        score_thresh (0.05), nms_thresh (0.5), detections_per_img (100), topk_candidates (1000 per level).
    Training:
        fg_iou_thresh (0.5), bg_iou_thresh (0.4), allow_low_quality_matches, focal_alpha (0.25),
        focal_gamma (2.0), box_loss ("smooth_l1" | "l1" | "giou"), smooth_l1_beta (1/9), bbox_reg_weights.
    Classification loss (the paper's Table 1 baselines):
        cls_loss: "focal" (default), "ce" (sigmoid cross-entropy, no alpha), "balanced-ce" (alpha-balanced
        CE, eq. 3: focal_alpha, gamma 0) or "ohem" (CE over the ohem_batch highest-loss anchors per image
        that survive NMS at ohem_nms_thresh; ohem_fg_ratio, e.g. 0.25 for 1:3, caps the foreground share,
        None = no cap). focal_alpha < 0 disables the alpha weighting.
    """
    num_classes: int = 80
    backbone: str = "resnet50"
    backbone_norm: str = "auto"
    trainable_backbone_layers: int = 3
    fpn_channels: int = 256
    num_extra_levels: int = 2
    p6_from: str = "c5"
    head_convs: int = 4
    head_norm: Optional[str] = None
    prior_prob: float = 0.01
    anchor_base_sizes: tuple = (32, 64, 128, 256, 512)
    scales_per_octave: int = 3
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    min_size: Union[int, tuple] = 800
    max_size: int = 1333
    fixed_size: Optional[tuple] = None
    size_divisible: int = 128
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    crop_size: int = 0
    crop_scale: float = 1.0
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    topk_candidates: int = 1000
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    allow_low_quality_matches: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0 / 9
    bbox_reg_weights: tuple = (1.0, 1.0, 1.0, 1.0)
    cls_loss: str = "focal"
    ohem_batch: int = 256
    ohem_nms_thresh: float = 0.7
    ohem_fg_ratio: Optional[float] = None

    def __post_init__(self):
        # Lists (from JSON, argparse or old checkpoints) become tuples, so configs compare and hash.
        for field in ("anchor_base_sizes", "aspect_ratios", "fixed_size", "image_mean", "image_std",
                      "bbox_reg_weights", "min_size"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        if isinstance(self.min_size, tuple) and len(self.min_size) == 1:
            object.__setattr__(self, "min_size", self.min_size[0])
        if self.head_norm == "none":
            object.__setattr__(self, "head_norm", None)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)
        check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        check(self.backbone in BACKBONES, f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        check(self.backbone_norm in ("auto", "frozen_bn", "bn"),
              f"backbone_norm must be 'auto', 'frozen_bn' or 'bn', got {self.backbone_norm!r}")
        check(0 <= self.trainable_backbone_layers <= 5,
              f"trainable_backbone_layers must be in [0, 5], got {self.trainable_backbone_layers}")
        check(0 <= self.num_extra_levels <= 2, f"num_extra_levels must be 0, 1 or 2, got {self.num_extra_levels}")
        check(self.p6_from in ("c5", "p5"), f"p6_from must be 'c5' or 'p5', got {self.p6_from!r}")
        check(self.head_norm in (None, "gn"), f"head_norm must be None or 'gn', got {self.head_norm!r}")
        check(self.fpn_channels >= 1 and self.head_convs >= 0, "fpn_channels must be >= 1 and head_convs >= 0")
        num_levels = 3 + self.num_extra_levels
        check(len(self.anchor_base_sizes) == num_levels,
              f"{num_levels} pyramid levels need {num_levels} anchor_base_sizes, got {len(self.anchor_base_sizes)}")
        check(self.scales_per_octave >= 1 and len(self.aspect_ratios) >= 1,
              "scales_per_octave must be >= 1 and aspect_ratios non-empty")
        check(all(r > 0 for r in self.aspect_ratios), f"aspect_ratios must be positive, got {self.aspect_ratios}")
        check(0 <= self.prior_prob < 1, f"prior_prob must lie in [0, 1), got {self.prior_prob}")
        check_loss_names(self.box_loss, self.cls_loss)
        check(self.focal_gamma >= 0, f"focal_gamma must be >= 0, got {self.focal_gamma}")
        check(self.focal_alpha < 1, f"focal_alpha must be < 1 (negative = no alpha weighting), got {self.focal_alpha}")
        check(self.smooth_l1_beta >= 0, f"smooth_l1_beta must be >= 0, got {self.smooth_l1_beta}")
        check(self.ohem_batch >= 1, f"ohem_batch must be >= 1, got {self.ohem_batch}")
        check(0 < self.ohem_nms_thresh <= 1,
              f"ohem_nms_thresh must lie in (0, 1] (1 = no NMS), got {self.ohem_nms_thresh}")
        check(self.ohem_fg_ratio is None or 0 <= self.ohem_fg_ratio <= 1,
              f"ohem_fg_ratio must lie in [0, 1] (or None: no cap), got {self.ohem_fg_ratio}")
        check(self.crop_size >= 0, f"crop_size must be >= 0 (0 = whole images), got {self.crop_size}")
        check(self.crop_scale > 0, f"crop_scale must be > 0, got {self.crop_scale}")
        check(0 <= self.bg_iou_thresh <= self.fg_iou_thresh <= 1,
              f"need 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {self.bg_iou_thresh} and {self.fg_iou_thresh}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples) for checkpoints and JSON; ``ModelConfig(**d)`` rebuilds it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, source: str = "model_config") -> "ModelConfig":
        """Read a checkpoint's ``model_config``, including those of older versions of this code."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - set(LEGACY_EXECUTION_KEYS))
        if unknown:
            raise ConfigError(f"{source} has unknown keys {unknown}: written by a newer version of this code?")
        return cls(**{k: v for k, v in values.items() if k in known})


def field_names() -> tuple:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))
