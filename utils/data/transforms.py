"""Data augmentation on ``(image, target)`` pairs from ``coco_dataset.CocoDetection``.

``image`` is a ``ByteTensor[3, H, W]``; ``target`` holds ``boxes`` and
``crowd_boxes`` as ``FloatTensor[N, 4]`` absolute ``x1, y1, x2, y2``. Every
transform moves the image and all its boxes together and returns a new target
dict (never edits the one it was given). Resizing, including multi-scale
training, is the model's job (``model/transform.py``), not the dataset's.
"""
import torch

BOX_KEYS = ("boxes", "crowd_boxes")


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``[..., 4]`` x1, y1, x2, y2 boxes in an image ``width`` wide: x1' = W - x2, x2' = W - x1."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


class RandomHorizontalFlip:
    """Flip the image left-right with probability ``p``, with its boxes and crowd boxes."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict):
        # torch's RNG, not `random`: DataLoader seeds it per worker, so runs are reproducible.
        if torch.rand(()).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        for key in BOX_KEYS:
            if key in target:
                target[key] = hflip_boxes(target[key], width)
        return image.flip(-1), target

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


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
