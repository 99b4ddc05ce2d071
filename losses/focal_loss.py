"""Sigmoid focal loss (Lin et al. 2017, eq. 5), computed from logits: the paper's formula, the reference.

This is not the code that trains. RetinaNet's loss runs the fused kernel
``ops/fused_focal_loss.py`` (:func:`ops.fused_focal_loss.focal_loss_from_labels`: the same
loss summed against class labels, without one-hot targets, gradient computed in the forward
pass). ``tests/model/test_speed_paths.py::test_focal_loss_from_labels_equals_plain_focal_loss``
checks the kernel equal to this formula in value and gradient, and ``tests/losses/test_focal_loss.py``
checks this formula against ``torchvision.ops.sigmoid_focal_loss``. The figures and analysis
tools (``tools/plot_focal_loss.py``, ``tools/loss_distribution.py``) call it directly.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """Focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` for independent sigmoid classifiers.

    Args:
        inputs: logits of any shape (fp32, fp16 or bf16).
        targets: same shape, 1 for the positive class and 0 otherwise (soft values allowed).
        alpha: weight of positives in (0, 1); a negative value disables the weighting.
        gamma: focusing exponent; gamma = 0 and alpha < 0 give binary cross-entropy.
        reduction: "none" | "mean" | "sum".

    The maths runs in fp32 whatever the input dtype: under autocast the logits of
    ~10^6 anchors come in half precision, where ``log(p)`` of a confident
    negative underflows. The log term uses ``binary_cross_entropy_with_logits``
    (log-sum-exp form, finite for logits of +-100), and ``1 - p_t`` is built from
    ``sigmoid(-x)`` rather than ``1 - sigmoid(x)`` to keep precision when p -> 1.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    inputs = inputs.float()
    targets = targets.to(inputs.dtype)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    prob = torch.sigmoid(inputs)
    one_minus_prob = torch.sigmoid(-inputs)
    one_minus_p_t = prob * (1 - targets) + one_minus_prob * targets
    loss = ce * one_minus_p_t.pow(gamma) if gamma != 0 else ce
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
