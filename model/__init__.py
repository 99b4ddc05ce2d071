"""RetinaNet model package. ``build_retinanet`` is the one way code builds a model."""
import torch

from losses.retinanet_loss import RetinaNetLoss
from model.anchors import AnchorGenerator, default_anchor_sizes
from model.backbone import BACKBONES, ResNetBackbone
from model.fpn import FPN
from model.head import RetinaNetHead
from model.retinanet import RetinaNet
from model.transform import IMAGENET_MEAN, IMAGENET_STD, ImageBatcher

__all__ = ["build_retinanet", "RetinaNet", "BACKBONES"]


def build_retinanet(num_classes: int = 80, backbone: str = "resnet50", pretrained_backbone=None,
                    trainable_backbone_layers: int = 3, backbone_norm: str = "auto",
                    fpn_channels: int = 256, num_extra_levels: int = 2, p6_from: str = "c5",
                    head_convs: int = 4, head_norm: str = None, prior_prob: float = 0.01,
                    anchor_base_sizes=(32, 64, 128, 256, 512), scales_per_octave: int = 3,
                    aspect_ratios=(0.5, 1.0, 2.0), min_size=800, max_size: int = 1333, fixed_size=None,
                    size_divisible: int = 128, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                    score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                    topk_candidates: int = 1000, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                    allow_low_quality_matches: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                    box_loss: str = "smooth_l1", smooth_l1_beta: float = 1.0 / 9,
                    bbox_reg_weights=(1.0, 1.0, 1.0, 1.0), channels_last: bool = False,
                    fold_batchnorm: bool = True, inference_channels_last: bool = True, compile_loss: bool = False,
                    winograd: bool = True,
                    weights: str = None) -> RetinaNet:
    """Build a RetinaNet. Defaults are the paper's COCO configuration (R-50, P3-P7, 800 px).

    Backbone:
        backbone: one of ``BACKBONES`` (resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d).
        pretrained_backbone: None (random init), a torchvision ImageNet weights tag
            ("DEFAULT", "IMAGENET1K_V1", ...) or a local ``.pth`` path.
        trainable_backbone_layers: stages trained from the top (0-5) when BatchNorm is frozen.
        backbone_norm: "auto" (frozen BN with pretrained weights, BN without), "frozen_bn" or "bn".
    Pyramid and head:
        fpn_channels: width of P levels and head towers (256).
        num_extra_levels: 2 = P6 + P7 (paper), 1 = P6, 0 = P3-P5 only.
        p6_from: "c5" (paper) or "p5" (torchvision v1).
        head_convs: convs per tower (4); head_norm: None or "gn"; prior_prob: pi (0.01).
    Anchors:
        anchor_base_sizes: size on each level (32..512 for P3..P7);
        scales_per_octave: 3 gives 2^0, 2^(1/3), 2^(2/3); aspect_ratios: (0.5, 1, 2).
    Input:
        min_size (int or tuple for multi-scale training), max_size, fixed_size (H, W) or None,
        size_divisible (pad multiple), image_mean, image_std, channels_last.
    Speed (none changes the outputs beyond float rounding; see benchmarks/README.md):
        fold_batchnorm: apply BatchNorm with fixed statistics (frozen, or in eval mode) by
            scaling the conv weights instead of a separate pass over the activations.
        inference_channels_last: in eval mode on CPU, run the convs on a channels_last
            batch (oneDNN's native layout); ``channels_last`` sets training too.
        compile_loss: ``torch.compile`` the dense part of the loss (needs a C++ compiler on CPU).
        winograd: on CPU in float32, the 3x3 convs of the FPN and the heads with >= 256
            channels on >= 32 x 32 maps use Winograd F(2x2, 3x3) (``model/winograd.py``).
    Inference:
        score_thresh (0.05), nms_thresh (0.5), detections_per_img (100), topk_candidates (1000 per level).
    Training:
        fg_iou_thresh (0.5), bg_iou_thresh (0.4), allow_low_quality_matches, focal_alpha (0.25),
        focal_gamma (2.0), box_loss ("smooth_l1" | "l1" | "giou"), smooth_l1_beta (1/9), bbox_reg_weights.
    Weights:
        weights: None, or a trained detector to load (see :mod:`model.weights`): one of our
            checkpoints, a torchvision RetinaNet ``.pth`` or torchvision weights name such as
            "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1". The architecture, class list
            (``model.categories``) and torchvision's settings then come from the weights;
            only arguments given a non-default value override them. Returned in eval mode.

    The returned model carries ``model.config``: these arguments as a plain dict
    (with ``pretrained_backbone`` cleared), so ``build_retinanet(**model.config)``
    rebuilds the same architecture for a checkpoint.
    """
    config = {k: v for k, v in locals().items() if k != "weights"}
    if weights is not None:
        from model.weights import build_from_weights  # model.weights builds through this function
        return build_from_weights(weights, config)
    num_levels = 3 + num_extra_levels
    if len(anchor_base_sizes) != num_levels:
        raise ValueError(f"{num_levels} pyramid levels need {num_levels} anchor_base_sizes, "
                         f"got {len(anchor_base_sizes)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if backbone_norm == "auto":
        backbone_norm = "frozen_bn" if pretrained_backbone else "bn"
    body = ResNetBackbone(backbone, pretrained_backbone, trainable_backbone_layers, norm=backbone_norm,
                          fold_batchnorm=fold_batchnorm)
    fpn = FPN(body.out_channels, fpn_channels, num_extra_levels, p6_from, winograd=winograd)
    anchor_generator = AnchorGenerator(default_anchor_sizes(anchor_base_sizes, scales_per_octave), aspect_ratios)
    head = RetinaNetHead(fpn_channels, anchor_generator.num_anchors_per_location, num_classes, head_convs,
                         head_norm, prior_prob, winograd=winograd)
    transform = ImageBatcher(min_size, max_size, image_mean, image_std, size_divisible, fixed_size)
    loss = RetinaNetLoss(num_classes, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches, focal_alpha,
                         focal_gamma, box_loss, smooth_l1_beta, bbox_reg_weights, compile=compile_loss)
    model = RetinaNet(body, fpn, head, anchor_generator, transform, loss, num_classes, score_thresh,
                      nms_thresh, detections_per_img, topk_candidates, channels_last, inference_channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    config.update(backbone_norm=backbone_norm, pretrained_backbone=None)
    model.config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    return model

