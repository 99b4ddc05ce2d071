import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

from losses.focal_loss import sigmoid_focal_loss


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 2.0), (0.75, 0.0), (0.25, 3.5)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torchvision_values_and_gradients(alpha, gamma, reduction):
    logits = (torch.randn(64, 7) * 4).double()
    targets = (torch.rand(64, 7) > 0.8).double()
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.clone().requires_grad_()
    ours = sigmoid_focal_loss(ours_in, targets, alpha=alpha, gamma=gamma, reduction=reduction).double()
    ref = tv_focal_loss(ref_in, targets, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    weights = torch.rand_like(ours)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


def test_gamma_zero_alpha_negative_is_bce():
    logits, targets = torch.randn(100) * 3, (torch.rand(100) > 0.5).float()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0, reduction="mean"),
                               F.binary_cross_entropy_with_logits(logits, targets))


def test_finite_for_extreme_logits_with_finite_gradients():
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0, 0.0], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    loss = sigmoid_focal_loss(logits, targets)
    assert torch.isfinite(loss).all()
    # Confident and right costs ~nothing; confident and wrong costs ~alpha_t * 100.
    assert loss[0] < 1e-30 and loss[1] < 1e-30
    assert loss[2].item() == pytest.approx(0.75 * 100, rel=1e-4)
    assert loss[3].item() == pytest.approx(0.25 * 100, rel=1e-4)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_stay_finite_and_close(dtype):
    logits = torch.cat([torch.randn(1000) * 8, torch.tensor([60.0, -60.0, 11.0, -11.0])])
    targets = (torch.rand(1004) > 0.9).float()
    half = sigmoid_focal_loss(logits.to(dtype), targets.to(dtype))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    full = sigmoid_focal_loss(logits.to(dtype).float(), targets)
    torch.testing.assert_close(half, full)


def test_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(torch.zeros(2), torch.zeros(2), reduction="avg")
