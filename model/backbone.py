"""ResNet / ResNeXt trunks from torchvision, returning C3, C4, C5."""
import logging
import os
from collections import OrderedDict

import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from model.batchnorm_folding import FoldedConvs, foldable

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


def _resolve_weights(name: str, pretrained):
    """Map ``pretrained`` to (torchvision weights enum or None, local state dict or None)."""
    if pretrained in (None, False, "", "none"):
        return None, None
    if isinstance(pretrained, str) and (os.path.sep in pretrained or pretrained.endswith((".pth", ".pt"))):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"backbone weights file not found: {pretrained}")
        try:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"could not read backbone weights {pretrained}: {exc}") from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return None, state
    enum_name = BACKBONES[name][1]
    tag = "DEFAULT" if pretrained in (True, "imagenet", "DEFAULT") else str(pretrained).split(".")[-1]
    return torchvision.models.get_weight(f"{enum_name}.{tag}"), None


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier; ``forward`` returns ``[C3, C4, C5]``.

    Args:
        name: a key of ``BACKBONES``.
        pretrained: None (random init, trainable BatchNorm), a torchvision weights
            tag ("DEFAULT", "IMAGENET1K_V2", ...), or a path to a local ``.pth``
            state dict (for offline clusters).
        trainable_layers: with pretrained weights, how many stages from the top
            train (0-5; default 3 = layer2..layer4, stem and layer1 frozen as in
            the paper's Detectron setup). Ignored without pretrained weights.
        fold_batchnorm: apply each FrozenBatchNorm2d (and BatchNorm in eval mode) by
            scaling the conv before it instead of a separate pass over the activations
            (``model/batchnorm_folding.py``). Parameters, state dict and outputs (up to
            float rounding) are unchanged; trainable BatchNorm always runs as is.

    Pretrained trunks get FrozenBatchNorm2d (batch statistics of 2 images per GPU
    are too noisy to fine-tune); random trunks get ordinary BatchNorm so training
    from scratch works (convert it to SyncBatchNorm for multi-GPU if wanted).
    """

    def __init__(self, name: str = "resnet50", pretrained=None, trainable_layers: int = 3, norm: str = "auto",
                 fold_batchnorm: bool = True):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        weights, local_state = _resolve_weights(name, pretrained)
        is_pretrained = weights is not None or local_state is not None
        if norm == "auto":
            norm = "frozen_bn" if is_pretrained else "bn"
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"backbone norm must be 'auto', 'frozen_bn' or 'bn', got {norm!r}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
        trunk = BACKBONES[name][0](weights=weights, norm_layer=norm_layer)
        if local_state is not None:
            missing, unexpected = trunk.load_state_dict(local_state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing:
                raise ValueError(f"backbone weights {pretrained} do not fit {name}: missing {missing[:5]}...")
            logger.info("loaded backbone weights from %s (%d unused keys)", pretrained, len(unexpected))
        self.body = nn.Sequential(OrderedDict(
            (key, getattr(trunk, key)) for key in
            ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]))
        self.out_channels = [_stage_channels(trunk.layer2), _stage_channels(trunk.layer3),
                             _stage_channels(trunk.layer4)]
        self.norm = norm
        self.fold_batchnorm = fold_batchnorm
        self._folded = FoldedConvs()  # folded weights of frozen convs; never in the state dict
        # Frozen statistics go with frozen early stages: both assume a trunk that
        # already learned low-level filters on ImageNet.
        if norm == "frozen_bn":
            trainable = _STAGES[:trainable_layers] + (["bn1"] if trainable_layers == 5 else [])
            for param_name, param in self.body.named_parameters():
                param.requires_grad_(any(param_name.startswith(stage) for stage in trainable))

    def forward(self, images: torch.Tensor) -> list:
        """``[B, 3, H, W]`` -> ``[C3 [B, c3, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]]``."""
        body = self.body
        cpu_training = self.training and images.device.type == "cpu"
        if not (self.fold_batchnorm and foldable(body.bn1)):
            # Trainable BatchNorm: on CPU the whole trunk trains faster in channels_last
            # (oneDNN's native layout: NHWC BatchNorm, 1x1 convs and max-pool gain more than
            # the NHWC weight gradients of 3x3 convs lose; 7 % of a step, benchmarks/README.md).
            # (CPU inference gets a channels_last batch from the model already.)
            x = images.contiguous(memory_format=torch.channels_last) if cpu_training else images
            x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
            outputs = []
            for stage in _STAGES[::-1][1:]:  # layer1 .. layer4
                x = getattr(body, stage)(x)
                outputs.append(x)
            # The FPN and heads get NCHW, where their 3x3 convs train faster.
            return [c.contiguous() for c in outputs[1:]] if cpu_training else outputs[1:]
        # Folded (frozen) norms: only the frozen leading stages, which run forward alone,
        # gain from channels_last on CPU; trained stages have no BatchNorm left to speed
        # up and keep NCHW for their 3x3 weight gradients.
        num_frozen = self._num_frozen_stages() if cpu_training else 0
        x = images.contiguous(memory_format=torch.channels_last) if num_frozen else images
        x = body.maxpool(body.relu(self._folded("conv1", body.conv1, body.bn1, x)))
        outputs = []
        for stage_index, stage in enumerate(_STAGES[::-1][1:], start=1):  # layer1 .. layer4
            if stage_index == num_frozen:
                x = x.contiguous()
            for block_index, block in enumerate(getattr(body, stage)):
                x = self._block(f"{stage}.{block_index}", block, x)
            outputs.append(x)
        return [c.contiguous() for c in outputs[1:]] if num_frozen else outputs[1:]

    def train(self, mode: bool = True):
        self._folded.clear()  # training changes the weights; free the folded copies
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._folded.clear()  # .to(), .half(), ... give the tensors new storage
        return super()._apply(fn, *args, **kwargs)

    def _num_frozen_stages(self) -> int:
        """How many of stem, layer1, ..., layer4 from the bottom have no trainable parameter."""
        count = 0
        for stage in ["conv1"] + _STAGES[::-1][1:]:
            modules = [self.body.conv1, self.body.bn1] if stage == "conv1" else [getattr(self.body, stage)]
            if any(p.requires_grad for m in modules for p in m.parameters()):
                break
            count += 1
        return count

    def _block(self, name: str, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A torchvision BasicBlock / Bottleneck with each conv and its norm folded together."""
        out = block.relu(self._folded(f"{name}.conv1", block.conv1, block.bn1, x))
        if hasattr(block, "conv3"):
            out = block.relu(self._folded(f"{name}.conv2", block.conv2, block.bn2, out))
            out = self._folded(f"{name}.conv3", block.conv3, block.bn3, out)
        else:
            out = self._folded(f"{name}.conv2", block.conv2, block.bn2, out)
        if block.downsample is not None:
            x = self._folded(f"{name}.downsample", block.downsample[0], block.downsample[1], x)
        out += x
        return block.relu(out)


def _stage_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last conv)."""
    last_block = stage[-1]
    last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
    return last_conv.out_channels
