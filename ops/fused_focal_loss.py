"""The fused focal loss: the kernel RetinaNet trains with (summed against class labels, no one-hot targets).

``losses/retinanet_loss.py`` (focal, CE and alpha-balanced CE) and ``losses/ohem.py`` call
:func:`focal_loss_from_labels`; nothing in training calls the paper's formula itself.
That formula, written as the paper gives it, is ``losses/focal_loss.py``
(:func:`losses.focal_loss.sigmoid_focal_loss`, itself checked against
``torchvision.ops.sigmoid_focal_loss`` in ``tests/losses/test_focal_loss.py``). The two are checked
equal, value and gradient, against one-hot targets summed over the valid rows, by
``tests/model/test_speed_paths.py::test_focal_loss_from_labels_equals_plain_focal_loss`` (CPU,
chunked and not); on a GPU, ``benchmarks/gpu_correctness.py`` checks it against torchvision's.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss_from_labels(logits: Tensor, labels: Tensor, valid: Tensor, *, alpha: float = 0.25,
                           gamma: float = 2.0) -> Tensor:
    """Summed focal loss against one-hot class labels, without building the one-hot targets.

    Args:
        logits: ``[..., K]`` class logits (fp32, fp16 or bf16), e.g. ``[B, A, K]`` for all anchors.
        labels: ``Int64Tensor[...]``: the class in ``[0, K)`` of a foreground row, any negative
            value for a background row.
        valid: ``BoolTensor[...]``: rows that count; ignored anchors are False.

    Returns the fp32 scalar
    ``(sigmoid_focal_loss(logits, one_hot(labels) * (labels >= 0), alpha, gamma) * valid[..., None]).sum()``
    with the same gradient (checked in ``tests/model/test_speed_paths.py``).

    Why it is faster: nearly all of the ``A x K`` terms have target 0, where the loss is
    ``(1 - alpha) p^gamma softplus(x)``. That term is computed for every element and the
    one element of each foreground row is then replaced by its positive term. The
    gradient is computed in the same pass as the loss (the output is a sum, so it is all
    backward needs), and the rows are processed in chunks (on CPU small enough to stay
    in cache): the dozen element-wise passes of the plain formula over a 60 MB tensor
    (R-50, 512 px, batch 4) become one pass over memory, and no full-size temporaries
    beyond the gradient are kept.
    """
    return _FocalLossFromLabels.apply(logits, labels, valid, float(alpha), float(gamma))


# Elements per chunk. CPU: the fp32 chunk temporaries (1 MB each) stay in L2/L3.
# Elsewhere: big enough for few kernel launches, small enough that the temporaries
# stay well below the size of the logits themselves.
_CPU_CHUNK_ELEMENTS = 1 << 18
_DEVICE_CHUNK_ELEMENTS = 1 << 24


def _negative_terms(x: Tensor, gamma: float, need_grad: bool):
    """Per-row sums of ``p^gamma softplus(x)`` (the focal loss of target 0 without alpha) and,
    if asked, its derivative ``p^gamma (gamma (1 - p) softplus(x) + p)`` for every element."""
    prob = torch.sigmoid(x)
    softplus = F.softplus(x)  # = -log(1 - p), the cross-entropy of a negative, stable for large x
    prob_gamma = prob * prob if gamma == 2 else prob.pow(gamma)
    row_sums = torch.linalg.vecdot(prob_gamma, softplus)
    grad = torch.addcmul(prob, 1 - prob, softplus, value=gamma).mul_(prob_gamma) if need_grad else None
    return row_sums, grad


class _FocalLossFromLabels(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, labels, valid, alpha, gamma):
        with torch.autocast(logits.device.type, enabled=False):
            num_classes = logits.shape[-1]
            flat_logits = logits.reshape(-1, num_classes)
            labels, valid = labels.reshape(-1), valid.reshape(-1)
            rows = flat_logits.shape[0]
            neg_alpha, pos_alpha = (1 - alpha, alpha) if alpha >= 0 else (1.0, 1.0)
            neg_weight = valid.to(torch.float32) * neg_alpha  # [rows]
            need_grad = ctx.needs_input_grad[0]
            step = rows  # torch.compile fuses the whole tensor into one kernel instead
            if not torch.compiler.is_compiling():
                chunk = _CPU_CHUNK_ELEMENTS if logits.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
                step = max(1, chunk // max(num_classes, 1))
            if step >= rows:
                neg_sums, grad = _negative_terms(flat_logits.float(), gamma, need_grad)
                if grad is not None:
                    grad.mul_(neg_weight[:, None])
            else:
                neg_sums = flat_logits.new_empty(rows, dtype=torch.float32)
                grad = flat_logits.new_empty((rows, num_classes), dtype=torch.float32) if need_grad else None
                for start in range(0, rows, step):
                    sums, chunk_grad = _negative_terms(flat_logits[start:start + step].float(), gamma, need_grad)
                    neg_sums[start:start + step] = sums
                    if grad is not None:
                        torch.mul(chunk_grad, neg_weight[start:start + step, None], out=grad[start:start + step])

            # Foreground rows: swap the target-0 term of the labelled class for its target-1 term.
            foreground = (labels >= 0) & valid
            index = labels.clamp(min=0)[:, None]
            x = flat_logits.gather(1, index).squeeze(1).float()
            prob, one_minus_prob = torch.sigmoid(x), torch.sigmoid(-x)
            pos_loss = pos_alpha * one_minus_prob.pow(gamma) * F.softplus(-x)
            neg_loss = neg_alpha * prob.pow(gamma) * F.softplus(x)
            loss = torch.dot(neg_sums, neg_weight) + torch.dot(pos_loss - neg_loss, foreground.to(torch.float32))
            if grad is not None:
                pos_grad = -pos_alpha * one_minus_prob.pow(gamma) * (gamma * prob * F.softplus(-x) + one_minus_prob)
                grad.scatter_(1, index, torch.where(foreground, pos_grad, grad.gather(1, index).squeeze(1))[:, None])
                ctx.save_for_backward(grad)
                ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.logits_dtype).view(ctx.logits_shape), None, None, None, None
