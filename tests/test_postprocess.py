import torch
from torchvision.ops import batched_nms

from model.postprocess import postprocess_detections
from utils.boxes.box_ops import clip_boxes, decode_boxes


def reference_per_image(cls_logits, box_deltas, anchors, counts, image_size, score_thresh, topk, nms_thresh, cap):
    """Plain per-image, per-level loop in the style of the paper's description."""
    num_classes = cls_logits.shape[-1]
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
        boxes = decode_boxes(box_deltas[anchor_idx], anchors[anchor_idx])
        boxes_all.append(clip_boxes(boxes, *image_size))
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


def test_threshold_filters_everything():
    anchors = torch.tensor([[0.0, 0, 10, 10]] * 5)
    dets = postprocess_detections(torch.full((2, 5, 3), -10.0), torch.zeros(2, 5, 4), anchors, [5],
                                  [(20, 20), (20, 20)])
    assert all(len(d["boxes"]) == 0 and d["boxes"].shape == (0, 4) for d in dets)
