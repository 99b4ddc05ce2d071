"""The RetinaNet detector: images in, losses (training) or detections (eval) out."""
import torch
from torch import Tensor, nn

from losses.retinanet_loss import RetinaNetLoss
from model.anchors import AnchorGenerator, default_anchor_sizes
from model.backbone import ResNetBackbone
from model.config import ModelConfig
from model.fpn import FPN
from model.head import RetinaNetHead
from model.postprocess import postprocess_detections
from model.transform import ImageBatcher
from ops.fast_trunk import FastResNetTrunk
from ops.winograd import use_winograd
from utils.boxes.box_coder import BoxCoder


class RetinaNet(nn.Module):
    """One-stage detector (Lin et al. 2017) with torchvision's calling convention.

    ``model(images, targets)`` in training mode returns
    ``{"classification": loss, "bbox_regression": loss}``; ``model(images)`` in
    eval mode returns ``[{"boxes": [D, 4] xyxy, "scores": [D], "labels": [D]}]`` in
    each input image's own pixel coordinates.

    Images: a list of ``[3, H_i, W_i]`` tensors, float in [0, 1] or uint8, any sizes,
    on any device (moved to the model's). Targets: a list of dicts with "boxes"
    ``FloatTensor[N_i, 4]`` absolute xyxy in that image's pixels, "labels"
    ``Int64Tensor[N_i]`` in ``[0, num_classes)`` and optionally "crowd_boxes" ``[M_i, 4]``.

    Build it with :meth:`from_config` (``model.build_retinanet(**fields)`` is the same with the
    config's fields as keywords); load trained weights with :func:`model.weights.load_detector`;
    choose how it runs with :meth:`optimize_for`.
    """

    def __init__(self, backbone: nn.Module, fpn: nn.Module, head: nn.Module, anchor_generator: AnchorGenerator,
                 transform: ImageBatcher, box_coder: BoxCoder, loss: RetinaNetLoss, *, num_classes: int,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000):
        super().__init__()
        self.backbone, self.fpn, self.head = backbone, fpn, head
        self.anchor_generator, self.transform, self.box_coder, self.loss = anchor_generator, transform, box_coder, loss
        self.num_classes = num_classes
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.model_config = None  # the ModelConfig this model was built from (from_config)
        # Execution choices (optimize_for): the memory format of the input batch.
        self.channels_last, self.channels_last_cpu_inference = False, False

    @classmethod
    def from_config(cls, config: ModelConfig, pretrained_backbone=None) -> "RetinaNet":
        """The model ``config`` describes, with ImageNet weights in the trunk if ``pretrained_backbone``
        (a torchvision tag such as "DEFAULT" or a local ``.pth``) is given; random init otherwise.

        The one way to build a model from a configuration (``model.build_retinanet`` and
        ``model.weights.load_detector`` call it)."""
        body = ResNetBackbone(config.backbone, pretrained_backbone,
                              trainable_layers=config.trainable_backbone_layers, norm=config.backbone_norm)
        fpn = FPN(body.out_channels, out_channels=config.fpn_channels, num_extra_levels=config.num_extra_levels,
                  p6_from=config.p6_from)
        anchor_generator = AnchorGenerator(default_anchor_sizes(config.anchor_base_sizes, config.scales_per_octave),
                                           aspect_ratios=config.aspect_ratios)
        head = RetinaNetHead(in_channels=config.fpn_channels,
                             num_anchors=anchor_generator.num_anchors_per_location, num_classes=config.num_classes,
                             num_convs=config.head_convs, norm=config.head_norm, prior_prob=config.prior_prob)
        transform = ImageBatcher(min_size=config.min_size, max_size=config.max_size, image_mean=config.image_mean,
                                 image_std=config.image_std, size_divisible=config.size_divisible,
                                 fixed_size=config.fixed_size)
        box_coder = BoxCoder(config.bbox_reg_weights)
        loss = RetinaNetLoss(config.num_classes, box_coder, fg_iou_thresh=config.fg_iou_thresh,
                             bg_iou_thresh=config.bg_iou_thresh,
                             allow_low_quality_matches=config.allow_low_quality_matches,
                             focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma,
                             box_loss=config.box_loss, smooth_l1_beta=config.smooth_l1_beta, cls_loss=config.cls_loss,
                             ohem_batch=config.ohem_batch, ohem_nms_thresh=config.ohem_nms_thresh,
                             ohem_fg_ratio=config.ohem_fg_ratio)
        model = cls(body, fpn, head, anchor_generator, transform, box_coder, loss, num_classes=config.num_classes,
                    score_thresh=config.score_thresh, nms_thresh=config.nms_thresh,
                    detections_per_img=config.detections_per_img, topk_candidates=config.topk_candidates)
        model.model_config = config.replace(backbone_norm=body.norm)  # "auto" resolved
        return model

    @property
    def config(self) -> dict:
        """The configuration as a plain dict (what checkpoints store as ``model_config``):
        ``RetinaNet.from_config(ModelConfig(**model.config))`` rebuilds the same architecture."""
        return self.model_config.to_dict() if self.model_config is not None else {}

    def forward(self, images: list, targets: list = None):
        device = self.transform.image_mean.device
        _check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode: model(images, targets)")
            _check_targets(targets, len(images), self.num_classes)
            targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v)
                        for k, v in t.items()} for t in targets]
        images = [image.to(device, non_blocking=True) for image in images]
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, image_sizes, targets = self.transform(images, targets)
        if self.channels_last or (self.channels_last_cpu_inference and not self.training
                                  and batch.device.type == "cpu"):
            batch = batch.contiguous(memory_format=torch.channels_last)

        features = self.fpn(self.backbone(batch))
        feature_sizes = [tuple(f.shape[-2:]) for f in features]
        anchors = self.anchor_generator(tuple(batch.shape[-2:]), feature_sizes, torch.float32, batch.device)

        if self.training:
            cls_logits, box_deltas = self.head(features)
            return self.loss(cls_logits, box_deltas, anchors, targets)
        cls_logits, box_deltas = self.head.per_level(features)  # per level: no [B, A, K] concatenation
        detections = postprocess_detections(
            cls_logits, torch.cat(box_deltas, dim=1), anchors,
            self.anchor_generator.num_anchors_per_level(feature_sizes), image_sizes,
            score_thresh=self.score_thresh, topk_candidates=self.topk_candidates, nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img, box_coder=self.box_coder)
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    def optimize_for(self, device=None, *, channels_last: bool = False, fold_batchnorm: bool = True,
                     winograd: bool = True) -> "RetinaNet":
        """Choose how this model runs on ``device`` (default: where its parameters are), in place.

        None of this changes the parameters, the state dict or the outputs beyond float
        rounding, and none of it is saved in a checkpoint (``tests/model/test_speed_paths.py``,
        ``tests/model/test_winograd.py``; figures in benchmarks/README.md):

        - fold_batchnorm: BatchNorm with fixed statistics (frozen, or in eval mode) is applied
          by scaling the conv weights, and on CPU the trunk picks its faster memory layouts
          (``ops/fast_trunk.py``);
        - winograd: on CPU, the 3x3 convs of the FPN and heads with >= 256 channels take
          Winograd F(2x2, 3x3) on maps of 32 x 32 or more, in float32 (``ops/winograd.py``);
        - on CPU, eval-mode batches go channels_last (oneDNN's native layout); in training
          the trunk picks its own layout, since NHWC weight gradients of 3x3 convs are slower;
        - channels_last: the whole model and every batch in channels_last (GPUs with tensor cores).
        """
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if fold_batchnorm and not isinstance(self.backbone.body, FastResNetTrunk):
            self.backbone.body = FastResNetTrunk(self.backbone.body)
        if winograd and device.type == "cpu":
            use_winograd(self.fpn)
            use_winograd(self.head)
        self.channels_last_cpu_inference = device.type == "cpu"
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def compile_parts(self, **compile_kwargs) -> "RetinaNet":
        """``torch.compile`` the backbone, FPN, head and the dense part of the loss in place.

        The parts with fixed shapes for a fixed input size are compiled; the per-image
        pre-processing, matching and post-processing (varying box counts) stay eager.
        Parameter names and the state dict are unchanged (``nn.Module.compile``), so
        checkpoints load into compiled and eager models alike. ``compile_kwargs`` go to
        ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).
        """
        for part in (self.backbone, self.fpn, self.head):
            part.compile(**compile_kwargs)
        self.loss.compile_dense(**compile_kwargs)
        return self


def _check_images(images) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of [3, H, W] tensors")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image {i} must be a [3, H, W] tensor, got {shape}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image {i} is empty: shape {tuple(image.shape)}")


def _check_targets(targets, num_images: int, num_classes: int) -> None:
    """Validate targets where the user made them, before any compute."""
    if len(targets) != num_images:
        raise ValueError(f"got {num_images} images but {len(targets)} targets")
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"target {i} needs 'boxes' and 'labels', has {sorted(target)}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must be [N, 4], got {tuple(boxes.shape)}")
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"target {i}: labels must be [N] with N = {boxes.shape[0]}, got {tuple(labels.shape)}")
        if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"target {i}: labels must be integers, got {labels.dtype}")
        if boxes.numel():
            if not torch.isfinite(boxes).all():
                raise ValueError(f"target {i}: boxes contain NaN or inf")
            degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if degenerate.any():
                j = int(degenerate.nonzero()[0])
                raise ValueError(f"target {i}: degenerate box {j} {boxes[j].tolist()} (needs x2 > x1 and y2 > y1)")
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"target {i}: labels must lie in [0, {num_classes}), "
                                 f"got min {int(labels.min())} max {int(labels.max())}")
