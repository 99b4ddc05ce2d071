"""Feature Pyramid Network (Lin et al. 2017b) with RetinaNet's P6/P7 extra levels."""
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """C3..C5 -> P3..P5 by lateral 1x1 + top-down nearest upsampling + 3x3 smoothing,
    then P6 = 3x3/2 conv and P7 = 3x3/2 conv on ReLU(P6).

    Args:
        in_channels_list: channels of C3, C4, C5.
        out_channels: channels of every P level (256 in the paper).
        num_extra_levels: 2 gives P6 and P7 (the paper), 1 only P6, 0 none
            (small-image configurations where P6/P7 would be 1x1).
        p6_from: "c5" (the paper and torchvision v2: P6 sees the 2048-channel C5)
            or "p5" (torchvision v1 and detectron2: P6 from the smoothed P5).
    """

    def __init__(self, in_channels_list, *, out_channels: int = 256, num_extra_levels: int = 2,
                 p6_from: str = "c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"p6_from must be 'c5' or 'p5', got {p6_from!r}")
        if not 0 <= num_extra_levels <= 2:
            raise ValueError(f"num_extra_levels must be 0, 1 or 2, got {num_extra_levels}")
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels_list)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels_list)
        self.p6_from = p6_from
        extra_in = in_channels_list[-1] if p6_from == "c5" else out_channels
        self.extra_convs = nn.ModuleList()
        for level in range(num_extra_levels):
            self.extra_convs.append(nn.Conv2d(extra_in if level == 0 else out_channels, out_channels,
                                              3, stride=2, padding=1))
        self.out_channels = out_channels
        self.num_levels = len(in_channels_list) + num_extra_levels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # a=1 makes this the "Xavier fill" Detectron uses for FPN convs.
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list) -> list:
        """``[C3, C4, C5]`` -> ``[P3, ..., P7]``, each ``[B, out_channels, H_l, W_l]``."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            # Upsample to the exact lateral size: odd sizes do not halve evenly.
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outputs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        if self.extra_convs:
            x = features[-1] if self.p6_from == "c5" else outputs[-1]
            for level, conv in enumerate(self.extra_convs):
                # P7 sees ReLU(P6); P6 itself is taken before any non-linearity.
                x = conv(F.relu(x) if level > 0 else x)
                outputs.append(x)
        return outputs
