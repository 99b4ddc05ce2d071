"""Data augmentation on ``(image, target)`` pairs from ``coco_dataset.CocoDetection``.

``image`` is a ``ByteTensor[3, H, W]``; ``target`` holds ``boxes`` and
``crowd_boxes`` as ``FloatTensor[N, 4]`` absolute ``x1, y1, x2, y2``. Every
transform moves the image and all its boxes together and returns a new target
dict (never edits the one it was given). Resizing, including multi-scale
training, is the model's job (``model/transform.py``), not the dataset's; cutting
windows of large images is ``utils/data/crops.py``'s.

Every random choice comes from torch's RNG, which ``utils.data.loaders.SeededDataset``
seeds per (seed, epoch, index): augmentation is a function of those three, and a
resumed run sees the same images. A transform with probability 0 is never built
(:func:`build_train_transforms`), so it draws nothing.
"""
import torch

BOX_KEYS = ("boxes", "crowd_boxes")


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``[..., 4]`` x1, y1, x2, y2 boxes in an image ``width`` wide: x1' = W - x2, x2' = W - x1."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


class _RandomBoxTransform:
    """A transform applied with probability ``p`` (checked here, shown in the repr)."""
    kind = "flip"  # named in the error message

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{self.kind} probability must be in [0, 1], got {p}")
        self.p = p

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class RandomHorizontalFlip(_RandomBoxTransform):
    """Flip the image left-right with probability ``p``, with its boxes and crowd boxes."""

    def __call__(self, image: torch.Tensor, target: dict):
        # torch's RNG, not `random`: DataLoader seeds it per worker, so runs are reproducible.
        if torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        return image.flip(-1), _map_boxes(target, lambda boxes: hflip_boxes(boxes, width))


def vflip_boxes(boxes: torch.Tensor, height: int) -> torch.Tensor:
    """Mirror ``[..., 4]`` x1, y1, x2, y2 boxes in an image ``height`` tall: y1' = H - y2, y2' = H - y1."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, height - y2, x2, height - y1], dim=-1)


def rot90_boxes(boxes: torch.Tensor, height: int, width: int, k: int) -> torch.Tensor:
    """Boxes of an ``height`` x ``width`` image rotated as ``torch.rot90(image, k, dims=(-2, -1))``
    rotates it (k quarter turns anticlockwise as displayed); the result is ``width`` x ``height``
    for odd ``k``. A point (x, y) goes to (y, W - x) for k = 1, (W - x, H - y) for 2, (H - y, x) for 3."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    k = k % 4
    if k == 1:
        return torch.stack([y1, width - x2, y2, width - x1], dim=-1)
    if k == 2:
        return torch.stack([width - x2, height - y2, width - x1, height - y1], dim=-1)
    if k == 3:
        return torch.stack([height - y2, x1, height - y1, x2], dim=-1)
    return boxes.clone()


class RandomVerticalFlip(_RandomBoxTransform):
    """Flip the image top-bottom with probability ``p``, with its boxes and crowd boxes (top-down
    imagery and slides have no "up")."""

    def __call__(self, image: torch.Tensor, target: dict):
        if torch.rand(()).item() >= self.p:
            return image, target
        height = image.shape[-2]
        target = _map_boxes(target, lambda boxes: vflip_boxes(boxes, height))
        return image.flip(-2), target


class RandomRot90(_RandomBoxTransform):
    """With probability ``p``, rotate the image by k x 90 degrees, k uniform in {1, 2, 3}, with its
    boxes (exact for any image shape: a non-square image comes out ``W x H`` for k = 1, 3)."""
    kind = "rotation"

    def __call__(self, image: torch.Tensor, target: dict):
        if torch.rand(()).item() >= self.p:
            return image, target
        k = int(torch.randint(1, 4, ()))
        height, width = image.shape[-2:]
        target = _map_boxes(target, lambda boxes: rot90_boxes(boxes, height, width, k))
        if "orig_size" in target and k % 2:
            target["orig_size"] = (int(width), int(height))
        return torch.rot90(image, k, dims=(-2, -1)).contiguous(), target


class ColourJitter:
    """Random brightness, contrast and saturation of a uint8 RGB image; boxes are untouched.

    Three factors are drawn uniformly from ``[1 - strength, 1 + strength]``, for every image, and
    applied in this order on float copies of the 0-255 values, then rounded and clamped to uint8:
    brightness multiplies every value; contrast blends with the mean grey level of the image
    (``grey + c * (v - grey)``); saturation blends each pixel with its own grey level (ITU-R
    BT.601 luma: 0.299 R + 0.587 G + 0.114 B).
    """

    def __init__(self, strength: float = 0.2):
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"colour jitter strength must be in [0, 1), got {strength}")
        self.strength = strength

    def __call__(self, image: torch.Tensor, target: dict):
        brightness, contrast, saturation = (1 + self.strength * (2 * torch.rand(3) - 1)).tolist()
        values = image.float() * brightness
        mean_grey = _luma(values).mean()
        values = mean_grey + contrast * (values - mean_grey)
        grey = _luma(values)
        values = grey + saturation * (values - grey)
        return values.round_().clamp_(0, 255).to(torch.uint8), target

    def __repr__(self):
        return f"{type(self).__name__}(strength={self.strength})"


def _luma(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB -> ``[1, H, W]`` grey level."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
    return (image * weights).sum(dim=0, keepdim=True)


def _map_boxes(target: dict, transform) -> dict:
    target = dict(target)
    for key in BOX_KEYS:
        if key in target:
            target[key] = transform(target[key])
    return target


def build_train_transforms(hflip_prob: float = 0.5, vflip_prob: float = 0.0, rot90_prob: float = 0.0,
                           colour_jitter: float = 0.0):
    """The training augmentation, in this order: horizontal flip, vertical flip, 90-degree rotation,
    colour jitter; each only when its probability (strength) is > 0. None when nothing applies.
    With the defaults this is ``Compose([RandomHorizontalFlip(0.5)])``, as it has always been."""
    transforms = []
    if hflip_prob > 0:
        transforms.append(RandomHorizontalFlip(hflip_prob))
    if vflip_prob > 0:
        transforms.append(RandomVerticalFlip(vflip_prob))
    if rot90_prob > 0:
        transforms.append(RandomRot90(rot90_prob))
    if colour_jitter > 0:
        transforms.append(ColourJitter(colour_jitter))
    return Compose(transforms) if transforms else None


class Compose:
    """Apply ``(image, target) -> (image, target)`` transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: dict):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self):
        return f"{type(self).__name__}({self.transforms})"
