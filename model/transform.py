"""Images in -> one normalised, resized, padded batch tensor; detections back out."""
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageBatcher(nn.Module):
    """Resize (shorter side ``min_size``, longer side at most ``max_size``), normalise and pad.

    Args:
        min_size: int, or a tuple to draw from per image in training (multi-scale).
        max_size: cap on the longer side.
        image_mean, image_std: per-channel normalisation of [0, 1] images.
        size_divisible: the batch is padded (bottom/right, zeros after
            normalisation) to a multiple of this. 128 = 2^7 makes every level's
            stride exactly 2^l for P3..P7.
        fixed_size: (H, W) to resize every image to exactly, ignoring aspect
            ratio (for small fixed-size datasets and ``torch.compile``); None keeps it.
    """

    def __init__(self, *, min_size=800, max_size: int = 1333, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                 size_divisible: int = 128, fixed_size=None):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
        self.max_size = int(max_size)
        self.size_divisible = int(size_divisible)
        self.fixed_size = tuple(fixed_size) if fixed_size else None
        self.register_buffer("image_mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(3, 1, 1), persistent=False)

    def _target_scale(self, height: int, width: int) -> float:
        # One random size per image in training, the largest in eval (the usual convention).
        min_size = random.choice(self.min_size) if self.training else self.min_size[-1]
        return min(min_size / min(height, width), self.max_size / max(height, width))

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.fixed_size is not None:
            if (height, width) == self.fixed_size:
                return image
            return F.interpolate(image[None], size=self.fixed_size, mode="bilinear", align_corners=False)[0]
        scale = self._target_scale(height, width)
        # recompute_scale_factor makes the output floor(H * scale), the torchvision convention.
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]

    def forward(self, images: list, targets: list = None):
        """Args:
            images: list of ``[3, H_i, W_i]`` tensors, float in [0, 1] or uint8 in [0, 255].
            targets: optional list of dicts with "boxes" ``[N_i, 4]`` (and "crowd_boxes").

        Returns:
            batch ``[B, 3, H_pad, W_pad]``, image_sizes ``[(h_i, w_i)]`` after resizing,
            targets with boxes rescaled (new dicts; the caller's are untouched).
        """
        resized, image_sizes, scaled_targets = [], [], []
        for i, image in enumerate(images):
            if image.dtype == torch.uint8:
                image = image.float().div_(255)
            orig_h, orig_w = image.shape[-2:]
            image = self._resize(image)
            new_h, new_w = image.shape[-2:]
            resized.append(image)
            image_sizes.append((new_h, new_w))
            if targets is not None:
                target = dict(targets[i])
                for key in ("boxes", "crowd_boxes"):
                    if key in target:
                        target[key] = scale_boxes(target[key], new_w / orig_w, new_h / orig_h)
                scaled_targets.append(target)
        max_h = max(s[0] for s in image_sizes)
        max_w = max(s[1] for s in image_sizes)
        pad_h = int(math.ceil(max_h / self.size_divisible) * self.size_divisible)
        pad_w = int(math.ceil(max_w / self.size_divisible) * self.size_divisible)
        batch = resized[0].new_zeros((len(resized), 3, pad_h, pad_w))
        for image, padded in zip(resized, batch):
            padded[:, :image.shape[1], :image.shape[2]].copy_((image - self.image_mean) / self.image_std)
        return batch, image_sizes, (scaled_targets if targets is not None else None)

    @staticmethod
    def postprocess(detections: list, image_sizes: list, original_sizes: list) -> list:
        """Scale each image's boxes from the resized frame back to its original pixels."""
        for det, (h, w), (orig_h, orig_w) in zip(detections, image_sizes, original_sizes):
            det["boxes"] = scale_boxes(det["boxes"], orig_w / w, orig_h / h)
        return detections


def scale_boxes(boxes: torch.Tensor, scale_x: float, scale_y: float) -> torch.Tensor:
    """``[N, 4]`` xyxy boxes with x scaled by ``scale_x`` and y by ``scale_y`` (a new tensor).

    Python-number factors, not a ``torch.tensor([...], device=...)``: building a tensor from a
    list on the GPU is a blocking copy that waits for the GPU, once per image and step.
    """
    scaled = boxes.clone()
    scaled[..., 0::2] *= scale_x
    scaled[..., 1::2] *= scale_y
    return scaled
