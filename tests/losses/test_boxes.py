import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import generalized_box_iou

from utils.boxes.box_ops import (BBOX_XFORM_CLIP, box_ioa, box_iou, box_xywh_to_xyxy, box_xyxy_to_xywh, clip_boxes,
                         decode_boxes, elementwise_generalized_iou, encode_boxes)


def random_boxes(n, scale=100.0):
    xy = torch.rand(n, 2) * scale
    wh = torch.rand(n, 2) * scale + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_box_iou_matches_torchvision_and_batches():
    a, b = random_boxes(13), random_boxes(17)
    torch.testing.assert_close(box_iou(a, b), tv_box_iou(a, b))
    batch_a, batch_b = torch.stack([a, a.flip(0)]), torch.stack([b, b])
    batched = box_iou(batch_a, batch_b)
    assert batched.shape == (2, 13, 17)
    torch.testing.assert_close(batched[1], tv_box_iou(a.flip(0), b))


def test_iou_hand_computed_and_zero_area():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3], [5, 5, 5, 5]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 0.0]]))
    assert box_iou(b[1:], b[1:]).item() == 0.0  # not NaN


def test_ioa_is_fraction_of_first_box_inside_region():
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    crowd = torch.tensor([[0.0, 0, 5, 10]])
    torch.testing.assert_close(box_ioa(anchors, crowd), torch.tensor([[0.5], [0.0]]))


def test_generalized_iou_matches_torchvision_diagonal():
    a, b = random_boxes(20), random_boxes(20)
    torch.testing.assert_close(elementwise_generalized_iou(a, b), generalized_box_iou(a, b).diagonal(),
                               rtol=1e-5, atol=1e-5)


def test_encode_decode_round_trip_with_weights():
    anchors, gt = random_boxes(50), random_boxes(50)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        deltas = encode_boxes(gt, anchors, weights)
        torch.testing.assert_close(decode_boxes(deltas, anchors, weights), gt, rtol=1e-4, atol=1e-3)


def test_encode_hand_computed():
    anchor = torch.tensor([0.0, 0, 10, 20])
    gt = torch.tensor([5.0, 0, 25, 20])  # centre moves by 10 px = 1 width, width doubles
    torch.testing.assert_close(encode_boxes(gt, anchor), torch.tensor([1.0, 0.0, math.log(2), 0.0]))


def test_decode_clamps_huge_size_deltas():
    anchor = torch.tensor([[0.0, 0, 16, 16]])
    boxes = decode_boxes(torch.tensor([[0.0, 0, 50, 50]]), anchor)
    assert torch.isfinite(boxes).all()
    expected_half = 0.5 * 16 * math.exp(BBOX_XFORM_CLIP)  # = 500
    torch.testing.assert_close(boxes, torch.tensor([[8 - expected_half, 8 - expected_half,
                                                      8 + expected_half, 8 + expected_half]]))


def test_format_conversions_and_clip():
    xyxy = random_boxes(10)
    torch.testing.assert_close(box_xywh_to_xyxy(box_xyxy_to_xywh(xyxy)), xyxy)
    clipped = clip_boxes(torch.tensor([[-5.0, -5, 50, 50], [10, 10, 20, 20]]), 30, 40)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0, 40, 30], [10, 10, 20, 20]]))


coords = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(coords, coords, coords, coords), min_size=1, max_size=8),
       st.lists(st.tuples(coords, coords, coords, coords), min_size=1, max_size=8))
def test_iou_property_bounded_and_symmetric(boxes_a, boxes_b):
    # Sort corners so every box is valid (possibly zero-area).
    def fix(rows):
        t = torch.tensor(rows, dtype=torch.float32)
        return torch.stack([torch.minimum(t[:, 0], t[:, 2]), torch.minimum(t[:, 1], t[:, 3]),
                            torch.maximum(t[:, 0], t[:, 2]), torch.maximum(t[:, 1], t[:, 3])], dim=1)
    a, b = fix(boxes_a), fix(boxes_b)
    iou = box_iou(a, b)
    assert torch.isfinite(iou).all()
    assert (iou >= 0).all() and (iou <= 1 + 1e-5).all()
    torch.testing.assert_close(iou, box_iou(b, a).T)
    giou = elementwise_generalized_iou(a[:1].expand(len(b), 4), b)
    assert torch.isfinite(giou).all() and (giou >= -1 - 1e-5).all() and (giou <= 1 + 1e-5).all()


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4), st.floats(-1e4, 1e4))
def test_decode_property_finite_and_ordered(dx, dy, dw, dh):
    anchors = torch.tensor([[0.0, 0, 32, 32], [100, 100, 101, 164]])
    boxes = decode_boxes(torch.tensor([[dx, dy, dw, dh]] * 2), anchors)
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
