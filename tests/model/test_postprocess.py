"""model/postprocess.py against references that share none of its code: torchvision's BoxCoder
decode, ``clip_boxes_to_image`` and ``batched_nms`` on a per-image, per-level loop, and a case
small enough to decode, clip and suppress by hand."""
import math

import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image

from model.postprocess import postprocess_detections


def reference_per_image(cls_logits, box_deltas, anchors, counts, image_size, score_thresh, topk, nms_thresh, cap):
    """Plain per-image, per-level loop in the style of the paper's description, on torchvision's box ops.

    cls_logits ``[N, K]``, box_deltas ``[N, 4]``, anchors ``[N, 4]`` xyxy; image_size ``(h, w)``.
    """
    num_classes = cls_logits.shape[-1]
    decoder = TorchvisionBoxCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16))
    boxes_all, scores_all, labels_all = [], [], []
    start = 0
    for count in counts:
        scores = torch.sigmoid(cls_logits[start:start + count]).flatten()
        keep = scores > score_thresh
        idx = torch.nonzero(keep).flatten()
        scores = scores[keep]
        k = min(topk, len(idx))
        scores, order = scores.topk(k)
        idx = idx[order]
        anchor_idx, labels = idx // num_classes + start, idx % num_classes
        boxes = decoder.decode_single(box_deltas[anchor_idx], anchors[anchor_idx])
        boxes_all.append(clip_boxes_to_image(boxes, image_size))
        scores_all.append(scores)
        labels_all.append(labels)
        start += count
    boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:cap]
    return boxes[keep], scores[keep], labels[keep]


def test_batched_postprocess_equals_per_image_reference():
    counts = [400, 100, 25]
    num_anchors, num_classes = sum(counts), 4
    anchors = torch.rand(num_anchors, 2) * 80
    anchors = torch.cat([anchors, anchors + torch.rand(num_anchors, 2) * 30 + 4], 1)
    cls_logits = torch.randn(3, num_anchors, num_classes) * 2
    box_deltas = torch.randn(3, num_anchors, 4) * 0.2
    image_sizes = [(100, 90), (64, 100), (90, 90)]
    dets = postprocess_detections(cls_logits, box_deltas, anchors, counts, image_sizes, score_thresh=0.3,
                                  topk_candidates=150, nms_thresh=0.5, detections_per_img=40)
    for i in range(3):
        boxes, scores, labels = reference_per_image(cls_logits[i], box_deltas[i], anchors, counts, image_sizes[i],
                                                    0.3, 150, 0.5, 40)
        assert len(dets[i]["scores"]) == len(scores) == 40  # the cap binds with this many candidates
        torch.testing.assert_close(dets[i]["scores"], scores)
        torch.testing.assert_close(dets[i]["boxes"], boxes)
        assert torch.equal(dets[i]["labels"], labels)
        assert (dets[i]["boxes"][:, 2] <= image_sizes[i][1]).all() and (dets[i]["boxes"][:, 3] <= image_sizes[i][0]).all()


def test_hand_decoded_clipped_and_suppressed():
    # Anchor 0 (20 x 40, centre (20, 30)) moved by half its width right, a quarter of its height up,
    # twice as wide: centre (30, 20), 40 x 40 -> [10, 0, 50, 40]. Anchor 1 is anchor 0 shifted 2 px:
    # [12, 0, 52, 40], IoU 0.905 with box 0 (0.943 once clipped), so as class 0 it is suppressed but
    # as class 1 it stays. Anchor 2 decodes to itself; its score 0.047 is under the threshold.
    anchors = torch.tensor([[10.0, 10, 30, 50], [12.0, 10, 32, 50], [0.0, 0, 10, 10]])
    deltas = torch.tensor([[0.5, -0.25, math.log(2), 0.0], [0.5, -0.25, math.log(2), 0.0], [0.0, 0, 0, 0]])
    logits = torch.full((3, 2), -10.0)
    logits[0, 0], logits[1, 0], logits[1, 1], logits[2, 1] = 2.0, 1.0, 0.0, -3.0
    image_sizes = [(35, 45), (100, 100)]  # (h, w): the first clips the boxes, the second does not
    dets = postprocess_detections(logits.expand(2, -1, -1), deltas.expand(2, -1, -1), anchors, [3], image_sizes,
                                  score_thresh=0.05, topk_candidates=10, nms_thresh=0.5, detections_per_img=10)
    expected_boxes = [[[10.0, 0, 45, 35], [12.0, 0, 45, 35]], [[10.0, 0, 50, 40], [12.0, 0, 52, 40]]]
    for det, boxes in zip(dets, expected_boxes):
        torch.testing.assert_close(det["boxes"], torch.tensor(boxes))
        torch.testing.assert_close(det["scores"], torch.tensor([1 / (1 + math.exp(-2.0)), 0.5]))
        assert det["labels"].tolist() == [0, 1]


def test_threshold_filters_everything():
    anchors = torch.tensor([[0.0, 0, 10, 10]] * 5)
    dets = postprocess_detections(torch.full((2, 5, 3), -10.0), torch.zeros(2, 5, 4), anchors, [5],
                                  [(20, 20), (20, 20)])
    assert all(len(d["boxes"]) == 0 and d["boxes"].shape == (0, 4) for d in dets)
