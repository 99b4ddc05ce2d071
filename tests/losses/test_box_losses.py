"""Smooth L1 against torch's ``F.smooth_l1_loss``: the element-wise loss at several betas (the paper's
1/9, the L1 limit) and the detector's box term (summed over foreground anchors, divided by their count)."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

from losses.box_losses import smooth_l1_loss
from losses.retinanet_loss import RetinaNetLoss
from model import build_retinanet

BETAS = [1.0 / 9, 0.05, 0.5, 1.0, 3.0, 1e-6, 0.0]


@pytest.mark.parametrize("beta", BETAS)
def test_elementwise_smooth_l1_equals_torch(beta):
    pred = torch.randn(7, 4) * 0.5
    target = pred + torch.randn(7, 4) * torch.tensor([0.01, 0.1, 1.0, 4.0])  # both branches at every beta
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta), F.smooth_l1_loss(pred, target, beta=beta,
                                                                                     reduction="none"))
    if beta < 1e-5:  # the L1 limit
        torch.testing.assert_close(smooth_l1_loss(pred, target, beta), (pred - target).abs())


def test_half_precision_inputs_give_the_fp32_loss():
    pred, target = torch.randn(5, 4), torch.randn(5, 4)
    loss = smooth_l1_loss(pred.bfloat16(), target.bfloat16(), 1.0 / 9)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.smooth_l1_loss(pred.bfloat16().float(), target.bfloat16().float(),
                                                      beta=1.0 / 9, reduction="none"))


# Anchors 0-2 are foreground (IoU > 0.5 with one object each: 1, 0.64, 0.81), 3-4 background (IoU 0).
ANCHORS = torch.tensor([[10.0, 10, 50, 50], [12.0, 12, 44, 44], [60.0, 60, 96, 96], [0.0, 70, 20, 90],
                        [70.0, 0, 90, 20]])
FOREGROUND, MATCHED_OBJECT = [0, 1, 2], [0, 0, 1]
TARGET = {"boxes": torch.tensor([[10.0, 10, 50, 50], [58.0, 58, 98, 98]]), "labels": torch.tensor([0, 1])}


def reference_box_term(deltas, beta):
    """Σ over foreground anchors of F.smooth_l1_loss(deltas, torchvision-encoded target), / their count."""
    encoder = TorchvisionBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    targets = encoder.encode_single(TARGET["boxes"][MATCHED_OBJECT], ANCHORS[FOREGROUND])
    if beta == 0.0:
        return F.l1_loss(deltas[0, FOREGROUND], targets, reduction="sum") / len(FOREGROUND)
    return F.smooth_l1_loss(deltas[0, FOREGROUND], targets, beta=beta, reduction="sum") / len(FOREGROUND)


@pytest.mark.parametrize("beta", [1.0 / 9, 0.5, 1.0])
def test_box_term_is_torch_smooth_l1_over_foreground_anchors(beta):
    deltas = torch.randn(1, len(ANCHORS), 4) * 0.3
    criterion = RetinaNetLoss(num_classes=2, box_loss="smooth_l1", smooth_l1_beta=beta)
    losses = criterion(torch.zeros(1, len(ANCHORS), 2), deltas, ANCHORS, [TARGET])
    torch.testing.assert_close(losses["bbox_regression"], reference_box_term(deltas, beta))


def test_box_term_defaults_and_l1():
    deltas = torch.randn(1, len(ANCHORS), 4) * 0.3
    logits = torch.zeros(1, len(ANCHORS), 2)
    default = build_retinanet(num_classes=2, backbone="resnet18", min_size=64, max_size=64).loss
    assert default.smooth_l1_beta == pytest.approx(1.0 / 9)  # the paper's beta
    torch.testing.assert_close(default(logits, deltas, ANCHORS, [TARGET])["bbox_regression"],
                               reference_box_term(deltas, 1.0 / 9))
    l1 = RetinaNetLoss(num_classes=2, box_loss="l1", smooth_l1_beta=1.0 / 9)  # "l1" ignores the beta
    torch.testing.assert_close(l1(logits, deltas, ANCHORS, [TARGET])["bbox_regression"], reference_box_term(deltas, 0.0))
