"""A faster way to run a torchvision ResNet trunk: BatchNorm folded into the convs, CPU-friendly layouts.

:class:`FastResNetTrunk` takes over the child modules of a trunk with torchvision's
names (``conv1 bn1 relu maxpool layer1 .. layer4``, BasicBlock / Bottleneck blocks),
e.g. ``model.backbone.ResNetTrunk``, and returns the same ``[C3, C4, C5]``. The modules
are the same objects, so parameters, the state dict and the optimizer's parameter list
are unchanged; only the arithmetic order differs (float rounding). Chosen at run time
by ``RetinaNet.optimize_for``, never saved in a checkpoint.
"""
import torch
from torch import Tensor, nn

from ops.batchnorm_folding import FoldedConvs, foldable

_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_CHANNELS_LAST = torch.channels_last


class FastResNetTrunk(nn.Module):
    """Runs a ResNet trunk with BatchNorm folded into the convs where its statistics are fixed.

    - FrozenBatchNorm2d (training and eval) and BatchNorm in eval mode are applied by
      scaling the conv weights (``ops/batchnorm_folding.py``); the folded copies of
      frozen convs are cached, trainable ones are folded on every call.
    - On CPU in training, frozen leading stages run in channels_last (oneDNN's native
      layout; they only run forward); a trunk with trainable BatchNorm runs wholly in
      channels_last (NHWC BatchNorm, 1x1 convs and max-pool gain more than the NHWC
      weight gradients of 3x3 convs lose: 7 % of a step, benchmarks/README.md). The
      outputs are handed on in NCHW, where the FPN's and heads' 3x3 convs train faster.

    Args:
        trunk: a module with torchvision's ResNet children (its ``forward`` is not used).
        fold_batchnorm: False runs the unfolded norms (equivalence tests), keeping the layouts.
    """

    def __init__(self, trunk: nn.Module, fold_batchnorm: bool = True):
        super().__init__()
        for name in _CHILDREN:
            setattr(self, name, getattr(trunk, name))
        self.fold_batchnorm = fold_batchnorm
        self._folded = FoldedConvs()  # folded weights of frozen convs; never in the state dict

    def forward(self, images: Tensor) -> list:
        """``[B, 3, H, W]`` -> ``[C3 [B, c3, H/8, W/8], C4 [.., H/16, ..], C5 [.., H/32, ..]]``."""
        cpu_training = self.training and images.device.type == "cpu"
        if not (self.fold_batchnorm and foldable(self.bn1)):
            x = images.contiguous(memory_format=_CHANNELS_LAST) if cpu_training else images
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            outputs = []
            for stage in _STAGES:
                x = getattr(self, stage)(x)
                outputs.append(x)
            return [c.contiguous() for c in outputs[1:]] if cpu_training else outputs[1:]
        # Folded (frozen) norms: only the frozen leading stages gain from channels_last on
        # CPU; trained stages have no BatchNorm left to speed up and keep NCHW.
        num_frozen = self.num_frozen_stages() if cpu_training else 0
        x = images.contiguous(memory_format=_CHANNELS_LAST) if num_frozen else images
        x = self.maxpool(self.relu(self._folded("conv1", self.conv1, self.bn1, x)))
        outputs = []
        for stage_index, stage in enumerate(_STAGES, start=1):
            if stage_index == num_frozen:
                x = x.contiguous()
            for block_index, block in enumerate(getattr(self, stage)):
                x = self._block(f"{stage}.{block_index}", block, x)
            outputs.append(x)
        return [c.contiguous() for c in outputs[1:]] if num_frozen else outputs[1:]

    def train(self, mode: bool = True):
        self._folded.clear()  # training changes the weights; free the folded copies
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._folded.clear()  # .to(), .half(), ... give the tensors new storage
        return super()._apply(fn, *args, **kwargs)

    def num_frozen_stages(self) -> int:
        """How many of stem, layer1, ..., layer4 from the bottom have no trainable parameter."""
        count = 0
        for stage in ("conv1",) + _STAGES:
            modules = [self.conv1, self.bn1] if stage == "conv1" else [getattr(self, stage)]
            if any(p.requires_grad for m in modules for p in m.parameters()):
                break
            count += 1
        return count

    def _block(self, name: str, block: nn.Module, x: Tensor) -> Tensor:
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

