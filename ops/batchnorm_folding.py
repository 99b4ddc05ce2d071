"""Apply a fixed-statistics BatchNorm by scaling the conv before it.

``norm(conv(x))`` with frozen statistics is ``conv'(x)`` where ``conv'`` has the weights
scaled per output channel and a bias: one pass over the activations instead of
three (conv, multiply, add), and no BatchNorm output to allocate. Parameters and the
state dict are untouched; only the arithmetic order changes (float rounding).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


def foldable(norm: nn.Module) -> bool:
    """True for a norm layer that is a fixed per-channel affine map, so it can join the conv:
    FrozenBatchNorm2d always, BatchNorm only in eval mode (in training it uses batch statistics)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.running_mean is not None)


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> tuple:
    """(weight ``[C_out, C_in, k, k]``, bias ``[C_out]``) of the conv computing ``norm(conv(x))``.

    Differentiable: gradients reach the conv weight and the norm's affine parameters
    exactly as they would through the unfolded pair.
    """
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    # Multiplying keeps the weight's memory format (channels_last stays channels_last).
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


class FoldedConvs:
    """``norm(conv(x))`` through folded weights, with the folded copies of frozen convs cached.

    A cached entry is keyed by the storage and version counter of every tensor it came
    from, so an optimizer step, ``load_state_dict`` or ``.to()`` (all of which write or
    replace the tensors) invalidates it. Convs whose weights train are folded again on
    every call (cheap: the size of the weights, not of the activations) so autograd
    sees the real parameters.
    """

    def __init__(self):
        self._cache = {}  # name -> (key, weight, bias)

    def clear(self) -> None:
        self._cache.clear()

    def __call__(self, name: str, conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not foldable(norm):
            return norm(conv(x))
        tensors = [t for t in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                               norm.running_var) if t is not None]
        if (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.compiler.is_compiling():
            weight, bias = fold_conv_bn(conv, norm)
        else:
            # The weight is kept in the input's memory format, so the conv need not convert it.
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            key = (memory_format,) + tuple((t.data_ptr(), t._version) for t in tensors)
            cached = self._cache.get(name)
            if cached is None or cached[0] != key:
                with torch.no_grad():
                    weight, bias = fold_conv_bn(conv, norm)
                cached = (key, weight.contiguous(memory_format=memory_format), bias)
                self._cache[name] = cached
            _, weight, bias = cached
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
