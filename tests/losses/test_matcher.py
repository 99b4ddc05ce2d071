import torch
from torchvision.models.detection._utils import Matcher as TVMatcher
from torchvision.ops import box_iou as tv_box_iou

from utils.boxes.matcher import BACKGROUND, IGNORE, match_anchors


def test_thresholds_and_ignore_band():
    # One gt, four anchors with IoU 0.7, 0.45, 0.3, 0.55.
    iou = torch.tensor([[[0.7, 0.45, 0.3, 0.55]]])
    matched = match_anchors(iou, torch.ones(1, 1, dtype=torch.bool), allow_low_quality_matches=False)
    assert matched.tolist() == [[0, IGNORE, BACKGROUND, 0]]


def test_low_quality_match_keeps_best_anchor_and_ties():
    # gt 0 peaks at 0.3 on anchors 1 and 2 (a tie); gt 1 is matched normally.
    iou = torch.tensor([[[0.1, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.8]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert match_anchors(iou, valid, allow_low_quality_matches=False).tolist() == [[BACKGROUND] * 3 + [1]]
    assert match_anchors(iou, valid, allow_low_quality_matches=True).tolist() == [[BACKGROUND, 0, 0, 1]]


def test_box_without_any_overlap_claims_nothing():
    iou = torch.tensor([[[0.0, 0.0, 0.0]]])
    assert match_anchors(iou, torch.ones(1, 1, dtype=torch.bool)).tolist() == [[BACKGROUND] * 3]


def test_empty_ground_truth_and_padding():
    assert match_anchors(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.bool)).tolist() == [[BACKGROUND] * 5] * 2
    # Image 1 has only a padding row: it must stay background even though the padded IoU is high.
    iou = torch.tensor([[[0.9, 0.1]], [[0.9, 0.9]]])
    valid = torch.tensor([[True], [False]])
    assert match_anchors(iou, valid).tolist() == [[0, BACKGROUND], [BACKGROUND, BACKGROUND]]


def test_batched_equals_torchvision_matcher_per_image():
    tv = TVMatcher(0.5, 0.4, allow_low_quality_matches=True)
    anchors = torch.cat([torch.rand(300, 2) * 100, torch.rand(300, 2) * 100], 1)
    anchors[:, 2:] = anchors[:, :2] + torch.rand(300, 2) * 40 + 5
    gts = []
    for n in (3, 7, 1):
        xy = torch.rand(n, 2) * 100
        gts.append(torch.cat([xy, xy + torch.rand(n, 2) * 50 + 5], 1))
    padded = torch.zeros(3, 7, 4)
    valid = torch.zeros(3, 7, dtype=torch.bool)
    for i, g in enumerate(gts):
        padded[i, :len(g)], valid[i, :len(g)] = g, True
    from utils.boxes.box_ops import box_iou
    ours = match_anchors(box_iou(padded, anchors[None]), valid)
    for i, g in enumerate(gts):
        theirs = tv(tv_box_iou(g, anchors))
        assert torch.equal(ours[i], theirs), f"image {i}"
