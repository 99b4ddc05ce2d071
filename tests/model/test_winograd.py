"""Winograd F(2x2, 3x3) convolutions equal F.conv2d: values and all three gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ops.winograd as winograd
from ops.winograd import WinogradConv2d, conv3x3_winograd, use_winograd, winograd_applicable


def Conv3x3(in_channels, out_channels):
    """A Winograd conv made the way RetinaNet.optimize_for makes them: from a plain nn.Conv2d."""
    return WinogradConv2d.from_conv(nn.Conv2d(in_channels, out_channels, 3, padding=1))


def _compare(shape, out_channels, dtype, bias=True):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out_channels, shape[1], 3, 3, dtype=dtype) * 0.1).requires_grad_()
    b = torch.randn(out_channels, dtype=dtype, requires_grad=True) if bias else None
    inputs = (x, weight) + ((b,) if bias else ())
    got, expected = conv3x3_winograd(x, weight, b), F.conv2d(x, weight, b, padding=1)
    grad_out = torch.randn_like(expected)
    return got, expected, torch.autograd.grad(got, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)


@pytest.mark.parametrize("shape,out_channels", [((2, 3, 7, 9), 5), ((1, 4, 8, 8), 2), ((3, 2, 5, 4), 3),
                                                ((2, 6, 1, 1), 4), ((1, 2, 2, 3), 1)])
def test_equals_conv2d_in_float64(shape, out_channels):
    """Odd and even sizes, a 1x1 map: exact up to float64 rounding, including every gradient."""
    got, expected, grads, expected_grads = _compare(shape, out_channels, torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv3x3_winograd, (x, weight, bias))


@pytest.mark.parametrize("tiles_per_step", [1, 7, 10_000])
def test_bands_cover_every_tile(tiles_per_step, monkeypatch):
    """The image is processed in bands of tile rows (a ragged last one too): same result."""
    monkeypatch.setattr(winograd, "_TILES_PER_STEP", tiles_per_step)
    got, expected, grads, expected_grads = _compare((2, 3, 11, 6), 4, torch.float64, bias=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_at_head_size_is_within_rounding():
    """A RetinaNet head conv (256 channels, an odd-sized P3): float32 rounding only."""
    got, expected, grads, expected_grads = _compare((1, 256, 33, 35), 256, torch.float32)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    for a, b in zip(grads, expected_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_conv3x3_is_a_drop_in_conv2d():
    torch.manual_seed(0)
    plain = nn.Conv2d(256, 256, 3, padding=1)
    fast = Conv3x3(256, 256)
    fast.load_state_dict(plain.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 256, 32, 32)
    assert winograd_applicable(x, fast)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    fast.winograd = False
    assert torch.equal(fast(x), plain(x))


def test_use_winograd_replaces_wide_3x3_convs_and_shares_their_parameters():
    net = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                        nn.Conv2d(256, 256, 3, stride=2, padding=1), nn.Sequential(nn.Conv2d(256, 512, 3, padding=1)),
                        nn.Conv2d(256, 256, 1))
    params = [id(p) for p in net.parameters()]
    keys = list(net.state_dict())
    assert use_winograd(net) == 2
    assert isinstance(net[0], WinogradConv2d) and isinstance(net[4][0], WinogradConv2d)
    assert type(net[2]) is nn.Conv2d and type(net[3]) is nn.Conv2d and type(net[5]) is nn.Conv2d
    assert [id(p) for p in net.parameters()] == params and list(net.state_dict()) == keys
    assert use_winograd(net) == 0  # already done


@pytest.mark.parametrize("case", ["small map", "few channels", "stride 2", "float64", "autocast", "channels_last"])
def test_falls_back_where_winograd_does_not_apply_or_pay(case):
    conv = Conv3x3(256, 256)
    x = torch.randn(1, 256, 32, 32)
    if case == "small map":
        x = x[:, :, :16, :16]
    elif case == "few channels":
        conv, x = Conv3x3(64, 64), x[:, :64]
    elif case == "stride 2":
        conv.stride = (2, 2)
    elif case == "float64":
        conv, x = conv.double(), x.double()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not winograd_applicable(x, conv)
            assert conv(x).dtype == torch.bfloat16
        return
    if case == "channels_last":  # applies; the input is made contiguous first
        x = x.contiguous(memory_format=torch.channels_last)
        assert winograd_applicable(x, conv)
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)
        return
    assert not winograd_applicable(x, conv)
    expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    assert torch.equal(conv(x), expected)


def test_retinanet_with_and_without_winograd_agree():
    """Where it applies (256-channel FPN and heads on a 32 x 32 P3), the model trains and
    detects as with plain convs: same losses, gradients and detections up to rounding."""
    from model import build_retinanet

    torch.manual_seed(0)
    # Frozen BatchNorm: trainable BatchNorm would update its running statistics between the runs.
    model = build_retinanet(num_classes=3, backbone="resnet18", head_convs=1, min_size=256, max_size=256,
                            prior_prob=0.3, backbone_norm="frozen_bn").optimize_for("cpu")
    assert model.head.cls_tower[0].winograd and model.fpn.output_convs[0].winograd
    images = [torch.rand(3, 256, 256), torch.rand(3, 256, 200)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 150, 160]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 5, 90, 98]]), "labels": torch.tensor([2])}]
    results = []
    for enabled in (True, False):
        for module in model.modules():
            if isinstance(module, WinogradConv2d):
                module.winograd = enabled
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            detections = model(images)
        results.append((losses, grads, detections))
    (losses, grads, detections), (plain_losses, plain_grads, plain_detections) = results
    for key in plain_losses:
        torch.testing.assert_close(losses[key], plain_losses[key], rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item() + 1e-8)
    for a, b in zip(detections, plain_detections):
        assert len(a["scores"]) == len(b["scores"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-2)
