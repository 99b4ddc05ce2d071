"""Anchor boxes for every pyramid level, generated on the features' device and cached."""
import torch
from torch import nn


def default_anchor_sizes(base_sizes=(32, 64, 128, 256, 512), scales_per_octave: int = 3) -> tuple:
    """Per-level size tuples: each base size times 2^(k / scales_per_octave), k = 0..n-1.

    Sizes are truncated to integers exactly as torchvision's RetinaNet does
    (32 -> 32, 40, 50), so weights trained by either repository see the same anchors.
    """
    return tuple(tuple(int(base * 2 ** (k / scales_per_octave)) for k in range(scales_per_octave))
                 for base in base_sizes)


class AnchorGenerator(nn.Module):
    """Anchors for a list of feature maps, in the order the head flattens its outputs.

    Order: level, then location (row-major: y, then x), then anchor, where the
    anchors of a location run over aspect ratios (outer) and sizes (inner) -- the
    same layout as ``torchvision.models.detection.anchor_utils.AnchorGenerator``.

    Args:
        sizes: one tuple of sizes (sqrt of area, in input pixels) per level.
        aspect_ratios: height / width ratios, shared by all levels.
    """

    def __init__(self, sizes=None, aspect_ratios=(0.5, 1.0, 2.0)):
        super().__init__()
        self.sizes = tuple(tuple(s) for s in (sizes or default_anchor_sizes()))
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.num_anchors_per_location = len(self.aspect_ratios) * len(self.sizes[0])
        if any(len(s) != len(self.sizes[0]) for s in self.sizes):
            raise ValueError("every level needs the same number of anchor sizes")
        self._cache = {}

    def cell_anchors(self, level: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Anchors centred on (0, 0) for one level: ``[A, 4]``, rounded to whole pixels."""
        scales = torch.as_tensor(self.sizes[level], dtype=dtype, device=device)
        ratios = torch.as_tensor(self.aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        widths = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        heights = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-widths, -heights, widths, heights], dim=1) / 2).round()

    def forward(self, image_size, feature_sizes, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Anchors of one (padded) batch: ``[sum_l H_l * W_l * A, 4]`` xyxy in input pixels.

        Args:
            image_size: (H, W) of the padded batch tensor.
            feature_sizes: [(H_l, W_l)] of every level.

        The stride of a level is ``image_size // feature_size``, which equals
        2^l when the batch is padded to a multiple of 2^7.
        """
        if len(feature_sizes) != len(self.sizes):
            raise ValueError(f"{len(feature_sizes)} feature maps but anchor sizes for {len(self.sizes)} levels")
        key = (tuple(image_size), tuple(map(tuple, feature_sizes)), dtype, str(device))
        anchors = self._cache.get(key)
        if anchors is None:
            per_level = []
            for level, (height, width) in enumerate(feature_sizes):
                stride_y, stride_x = image_size[0] // height, image_size[1] // width
                shifts_x = torch.arange(width, device=device, dtype=dtype) * stride_x
                shifts_y = torch.arange(height, device=device, dtype=dtype) * stride_y
                shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
                shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
                per_level.append((shifts + self.cell_anchors(level, dtype, device)[None]).reshape(-1, 4))
            anchors = torch.cat(per_level)
            if len(self._cache) > 64:  # multi-scale training sees many sizes; keep memory bounded
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def num_anchors_per_level(self, feature_sizes) -> list:
        return [h * w * self.num_anchors_per_location for h, w in feature_sizes]
