"""OHEM (losses/ohem.py): which anchors it picks, on hand-made and random cases, and the loss over them."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

import losses.ohem as ohem_module
from losses.ohem import anchor_cross_entropy, ohem_cross_entropy, select_hard_examples
from losses.retinanet_loss import RetinaNetLoss
from utils.boxes.matcher import IGNORE


def box(x, y, size=10.0):
    return [x, y, x + size, y + size]


def hand_made_image():
    """Seven anchors of one image. IoU(A0, A1) = 0.82, IoU(A0, A2) = 0.54; A3 sits exactly on A0 with the
    highest loss but is ignored, so it must neither be chosen nor suppress A0; A4-A6 overlap nothing."""
    boxes = torch.tensor([box(0, 0), box(0, 1), box(0, 3), box(0, 0), box(50, 50), box(80, 80), box(20, 20)])
    losses = torch.tensor([9.0, 8.0, 7.0, 10.0, 1.0, 5.0, 6.0])
    foreground = torch.tensor([True, True, True, False, False, False, True])
    valid = torch.tensor([True, True, True, False, True, True, True])
    return boxes, losses, foreground, valid


def chosen(mask):
    return mask.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("nms_thresh,fg_ratio,expected", [
    (0.7, None, [0, 2, 6]),     # A1 suppressed by A0 (IoU 0.82 > 0.7); the 3 highest-loss survivors
    (0.5, None, [0, 5, 6]),     # A2 suppressed too (0.54 > 0.5): A5 takes its place
    (1.0, None, [0, 1, 2]),     # no NMS: the 3 highest valid losses (A3 is ignored)
    (0.7, 1 / 3, [0, 4, 5]),    # one foreground place: A0; the other two go to the background A5 and A4
    (0.7, 0.0, [4, 5]),         # no foreground at all: only two background anchors exist
])
def test_hand_made_case_picks_exactly_the_expected_anchors(nms_thresh, fg_ratio, expected):
    boxes, losses, foreground, valid = hand_made_image()
    selected = select_hard_examples(losses[None], boxes[None], foreground[None], valid[None], batch_size=3,
                                    nms_thresh=nms_thresh, fg_ratio=fg_ratio)
    assert chosen(selected[0]) == expected


def test_budget_is_per_image_and_an_image_with_few_anchors_gives_what_it_has():
    boxes, losses, foreground, valid = hand_made_image()
    # Image 1: only A0 and A1 are valid, and A1 is suppressed by A0.
    valid_1 = torch.tensor([True, True, False, False, False, False, False])
    selected = select_hard_examples(torch.stack([losses, losses]), torch.stack([boxes, boxes]),
                                    torch.stack([foreground, foreground]), torch.stack([valid, valid_1]),
                                    batch_size=3, nms_thresh=0.7)
    assert chosen(selected[0]) == [0, 2, 6] and chosen(selected[1]) == [0]


def reference_selection(losses, boxes, foreground, valid, batch_size, nms_thresh, fg_ratio):
    """The definition, one image at a time: NMS over every valid anchor, then the quota."""
    result = torch.zeros_like(valid)
    for i in range(losses.shape[0]):
        index = valid[i].nonzero().squeeze(1)
        survivors = index[nms(boxes[i, index], losses[i, index], nms_thresh)]  # highest loss first
        if fg_ratio is None:
            keep = survivors[:batch_size]
        else:
            fg = survivors[foreground[i, survivors]][:round(fg_ratio * batch_size)]
            bg = survivors[~foreground[i, survivors]][:batch_size - len(fg)]
            keep = torch.cat([fg, bg])
        result[i, keep] = True
    return result


@pytest.mark.parametrize("batch_size,nms_thresh,fg_ratio", [(8, 0.7, None), (8, 0.5, 0.25), (16, 0.3, None),
                                                            (4, 0.5, 0.5), (64, 0.7, 0.25)])
def test_top_m_search_equals_nms_over_every_anchor(batch_size, nms_thresh, fg_ratio):
    # Dense, heavily overlapping boxes: most of the top 2 x batch_size anchors are suppressed,
    # so the search has to widen (and with a foreground quota, reach the low-loss positives).
    num_images, num_anchors = 3, 600
    xy = torch.rand(num_images, num_anchors, 2) * 60
    wh = torch.rand(num_images, num_anchors, 2) * 30 + 8
    boxes = torch.cat([xy, xy + wh], dim=-1)
    losses = torch.rand(num_images, num_anchors)
    foreground = torch.rand(num_images, num_anchors) < 0.05
    valid = torch.rand(num_images, num_anchors) > 0.1
    ours = select_hard_examples(losses, boxes, foreground, valid, batch_size=batch_size, nms_thresh=nms_thresh,
                                fg_ratio=fg_ratio)
    expected = reference_selection(losses, boxes, foreground, valid, batch_size, nms_thresh, fg_ratio)
    assert torch.equal(ours, expected)
    assert (ours & ~valid).sum() == 0 and (ours.sum(1) <= batch_size).all()
    if fg_ratio is not None:
        assert ((ours & foreground).sum(1) <= round(fg_ratio * batch_size)).all()


def test_anchor_cross_entropy_equals_torchvision_bce_summed_over_classes():
    logits = torch.randn(2, 50, 5) * 4
    labels = torch.where(torch.rand(2, 50) < 0.3, torch.randint(5, (2, 50)), -1)
    one_hot = F.one_hot(labels.clamp(min=0), 5).float() * (labels >= 0)[..., None]
    expected = tv_focal_loss(logits, one_hot, alpha=-1, gamma=0).sum(-1)
    torch.testing.assert_close(anchor_cross_entropy(logits, labels), expected)


def test_ohem_loss_is_cross_entropy_over_the_chosen_anchors_values_and_gradients(monkeypatch):
    torch.manual_seed(3)
    num_classes = 4
    anchors = torch.tensor([box(x, y, s) for s in (12.0, 24.0) for y in range(0, 64, 8) for x in range(0, 64, 8)])
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 28.0], [30.0, 30.0, 60.0, 62.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[10.0, 40.0, 40.0, 60.0]]), "labels": torch.tensor([0])}]
    logits = (torch.randn(2, len(anchors), num_classes) * 2).requires_grad_()
    deltas = torch.randn(2, len(anchors), 4) * 0.1
    loss_fn = RetinaNetLoss(num_classes, cls_loss="ohem", ohem_batch=16, ohem_nms_thresh=0.5, ohem_fg_ratio=0.25)
    picked = {}
    real_select = ohem_module.select_hard_examples

    def spy(*args, **kwargs):
        picked["mask"] = real_select(*args, **kwargs)
        return picked["mask"]
    monkeypatch.setattr(ohem_module, "select_hard_examples", spy)
    loss = loss_fn(logits, deltas, anchors, targets)["classification"]
    loss.backward()

    matched = loss_fn.match(anchors, targets)[0]
    mask = picked["mask"]
    assert mask.sum() == 2 * 16 and not (mask & (matched == IGNORE)).any()
    assert ((mask & (matched >= 0)).sum(1) <= 4).all()  # the 1:3 cap
    labels = torch.where(matched >= 0, torch.stack([torch.tensor([1, 3]), torch.tensor([0, 0])]).gather(
        1, matched.clamp(min=0)), -1)
    reference_in = logits.detach().clone().requires_grad_()
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).float() * (labels >= 0)[..., None]
    expected = (tv_focal_loss(reference_in, one_hot, alpha=-1, gamma=0).sum(-1) * mask).sum() / mask.sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad, reference_in.grad)
    assert (logits.grad[~mask] == 0).all()


def test_no_valid_anchor_gives_a_zero_loss_with_a_gradient():
    logits = torch.randn(1, 6, 3, requires_grad=True)
    labels = torch.full((1, 6), -1)
    loss, count = ohem_cross_entropy(logits, labels, torch.zeros(1, 6, dtype=torch.bool), torch.rand(1, 6, 4),
                                     batch_size=4)
    assert count == 0 and loss == 0
    loss.backward()
    assert (logits.grad == 0).all()
