"""ResNet / ResNeXt trunks from torchvision, returning C3, C4, C5."""
import logging
import os

import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from utils.runtime.checkpoint import CheckpointError, WeightsFileNotFoundError, torch_load
from utils.runtime.errors import ConfigError
from utils.runtime.hub import fetch_published_weights

logger = logging.getLogger(__name__)

# name -> (torchvision constructor, ImageNet weights enum name). A plain dict, not a registry.
BACKBONES = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
    "resnet152": (torchvision.models.resnet152, "ResNet152_Weights"),
    "resnext50_32x4d": (torchvision.models.resnext50_32x4d, "ResNeXt50_32X4D_Weights"),
    "resnext101_32x8d": (torchvision.models.resnext101_32x8d, "ResNeXt101_32X8D_Weights"),
}

# Freezing order, from the first stage trained last: trainable_layers=3 trains layer2..layer4.
_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _load_pretrained_state(name: str, pretrained):
    """The ImageNet state dict ``pretrained`` names (a local file or a torchvision tag), or None for random init.

    A torchvision tag is read from torch's hub cache, downloaded there once; offline, a
    one-line :class:`utils.runtime.hub.WeightsUnavailableError` says which file to copy where.
    """
    if pretrained in (None, False, "", "none"):
        return None
    if isinstance(pretrained, str) and (os.path.isfile(pretrained) or os.path.sep in pretrained
                                        or pretrained.endswith((".pth", ".pt"))):
        if not os.path.isfile(pretrained):
            raise WeightsFileNotFoundError(f"backbone weights file not found: {pretrained}")
        state = torch_load(pretrained, "backbone weights")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"backbone weights {pretrained} hold a {type(state).__name__}, not a state dict")
        return state
    enum_name = BACKBONES[name][1]
    tag = "DEFAULT" if pretrained in (True, "imagenet", "DEFAULT") else str(pretrained).split(".")[-1]
    try:
        weights = torchvision.models.get_weight(f"{enum_name}.{tag}")
    except (KeyError, ValueError):
        tags = ", ".join(["DEFAULT"] + [w.name for w in torchvision.models.get_model_weights(BACKBONES[name][0])])
        raise ConfigError(f"--pretrained-backbone {pretrained}: neither a file nor ImageNet weights of {name} "
                          f"({enum_name}: {tags}); or 'none' to train from scratch") from None
    return fetch_published_weights(weights, f"ImageNet weights of the {name} backbone",
                                   "pass a local copy with --pretrained-backbone PATH, or train from scratch with "
                                   "--pretrained-backbone none")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet's stem and four stages (its classifier dropped); ``forward`` returns C3..C5.

    The children keep torchvision's names (``conv1 bn1 relu maxpool layer1 .. layer4``),
    so state dicts and ImageNet weights load as they are.
    """

    def __init__(self, resnet: nn.Module):
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, images: Tensor) -> list:
        """``[B, 3, H, W]`` -> ``[C3 [B, c3, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier; ``forward`` returns ``[C3, C4, C5]``.

    Args:
        name: a key of ``BACKBONES``.
        pretrained: None (random init, trainable BatchNorm), a torchvision weights
            tag ("DEFAULT", "IMAGENET1K_V2", ...), or a path to a local ``.pth``
            state dict (for offline clusters).
        trainable_layers: with frozen BatchNorm, how many stages from the top train
            (0-5; default 3 = layer2..layer4, stem and layer1 frozen as in the paper's
            Detectron setup). Ignored with trainable BatchNorm.
        norm: "auto" (frozen with pretrained weights, else trainable), "frozen_bn" or "bn".

    Pretrained trunks get FrozenBatchNorm2d (batch statistics of 2 images per GPU
    are too noisy to fine-tune); random trunks get ordinary BatchNorm so training
    from scratch works (convert it to SyncBatchNorm for multi-GPU if wanted).
    """

    def __init__(self, name: str = "resnet50", pretrained=None, *, trainable_layers: int = 3, norm: str = "auto"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        local_state = _load_pretrained_state(name, pretrained)
        if norm == "auto":
            norm = "frozen_bn" if local_state is not None else "bn"
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"backbone norm must be 'auto', 'frozen_bn' or 'bn', got {norm!r}")
        # Built without weights= so that torchvision never downloads by itself: the weights
        # were fetched above, where an offline failure becomes one line.
        resnet = BACKBONES[name][0](weights=None, norm_layer=FrozenBatchNorm2d if norm == "frozen_bn"
                                    else nn.BatchNorm2d)
        if local_state is not None:
            missing, unexpected = resnet.load_state_dict(local_state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing:
                raise CheckpointError(f"backbone weights {pretrained} do not fit {name}: missing {missing[:5]}...")
            logger.info("loaded backbone weights from %s (%d unused keys)", pretrained, len(unexpected))
        self.body = ResNetTrunk(resnet)
        self.out_channels = [_stage_channels(resnet.layer2), _stage_channels(resnet.layer3),
                             _stage_channels(resnet.layer4)]
        self.norm = norm
        # Frozen statistics go with frozen early stages: both assume a trunk that
        # already learned low-level filters on ImageNet.
        if norm == "frozen_bn":
            trainable = _STAGES[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
            for param_name, param in self.body.named_parameters():
                param.requires_grad_(any(param_name.startswith(stage) for stage in trainable))

    def forward(self, images: Tensor) -> list:
        """``[B, 3, H, W]`` -> ``[C3, C4, C5]`` (strides 8, 16, 32)."""
        return self.body(images)


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last conv)."""
    last_block = stage[-1]
    last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
    return last_conv.out_channels
