"""The paper's Table 1 knobs: CE / alpha-CE / focal / OHEM classification losses and the anchor flags."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import sigmoid_focal_loss as tv_focal_loss

from losses.retinanet_loss import RetinaNetLoss
from model import RetinaNet, build_retinanet
from model.anchors import default_anchor_sizes
from model.config import ModelConfig
from recipes import resolve_config
from train_options import get_args_parser
from utils.boxes.matcher import IGNORE
from utils.runtime.errors import ConfigError

TINY = dict(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, head_norm="gn", num_extra_levels=1,
            anchor_base_sizes=(16, 32, 64, 128), min_size=64, max_size=64)


def dense_case(num_classes=5):
    """Anchors on a grid, two images with boxes: foreground, background and ignored anchors all occur."""
    anchors = torch.tensor([[x, y, x + s, y + s] for s in (10.0, 20.0, 40.0) for y in range(0, 80, 6)
                            for x in range(0, 80, 6)])
    targets = [{"boxes": torch.tensor([[3.0, 5.0, 25.0, 27.0], [40.0, 30.0, 78.0, 70.0]]),
                "labels": torch.tensor([2, 4])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 50.0]]), "labels": torch.tensor([0])}]
    logits = torch.randn(2, len(anchors), num_classes) * 3
    deltas = torch.randn(2, len(anchors), 4) * 0.1
    return logits, deltas, anchors, targets


def torchvision_reference(loss_fn, logits, anchors, targets, alpha, gamma):
    """torchvision's sigmoid_focal_loss summed over the non-ignored anchors, / the number of foreground anchors."""
    matched, _, gt_labels = loss_fn.match(anchors, targets)
    foreground, valid = matched >= 0, matched != IGNORE
    labels = gt_labels.gather(1, matched.clamp(min=0))
    one_hot = F.one_hot(labels, logits.shape[-1]).float() * foreground[..., None]
    per_element = tv_focal_loss(logits, one_hot, alpha=alpha, gamma=gamma)
    assert foreground.any() and (~valid).any() and (valid & ~foreground).any()
    return (per_element * valid[..., None]).sum() / foreground.sum()


@pytest.mark.parametrize("cls_loss,alpha,gamma", [("ce", -1, 0), ("balanced-ce", 0.75, 0), ("balanced-ce", 0.25, 0),
                                                  ("focal", 0.25, 2.0)])
def test_loss_equals_torchvision_sigmoid_focal_loss_values_and_gradients(cls_loss, alpha, gamma):
    logits, deltas, anchors, targets = dense_case()
    # The alpha given to "ce" must be ignored: CE has no alpha weighting.
    loss_fn = RetinaNetLoss(5, cls_loss=cls_loss, focal_alpha=0.9 if cls_loss == "ce" else alpha,
                            focal_gamma=5.0 if cls_loss != "focal" else gamma)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = loss_fn(ours_in, deltas, anchors, targets)["classification"]
    expected = torchvision_reference(loss_fn, ref_in, anchors, targets, alpha, gamma)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    ours.backward()
    expected.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-7)


def test_focal_with_gamma_zero_and_no_alpha_is_ce_exactly():
    logits, deltas, anchors, targets = dense_case()
    ce = RetinaNetLoss(5, cls_loss="ce")(logits, deltas, anchors, targets)
    focal = RetinaNetLoss(5, cls_loss="focal", focal_gamma=0.0, focal_alpha=-1.0)(logits, deltas, anchors, targets)
    assert all(torch.equal(ce[k], focal[k]) for k in ce)


@pytest.mark.parametrize("options", [dict(cls_loss="focal"), dict(cls_loss="ce"), dict(cls_loss="balanced-ce"),
                                     dict(cls_loss="ohem", ohem_batch=32),
                                     dict(cls_loss="ohem", ohem_batch=32, ohem_nms_thresh=0.5, ohem_fg_ratio=0.25)])
def test_each_classification_loss_trains_a_few_steps_with_finite_losses(options):
    torch.manual_seed(0)
    model = build_retinanet(**TINY, **options).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 6.0, 40.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 20.0, 60.0, 60.0], [2.0, 2.0, 14.0, 14.0]]),
                "labels": torch.tensor([0, 2])}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = model.head.cls_logits.weight.detach().clone()
    history = []
    for _ in range(4):
        losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(losses["classification"].detach()))
    assert not torch.equal(model.head.cls_logits.weight, before)
    assert history[-1] < history[0]  # the same batch four times: the classification loss goes down


def test_flags_reach_the_model_config_and_the_loss():
    args = get_args_parser().parse_args(
        ["--cls-loss", "ohem", "--focal-gamma", "1.5", "--focal-alpha", "-1", "--prior-prob", "0",
         "--fg-iou-thresh", "0.6", "--bg-iou-thresh", "0.3", "--smooth-l1-beta", "0.2", "--ohem-batch", "128",
         "--ohem-nms-thresh", "0.5", "--ohem-fg-ratio", "0.25", "--backbone", "resnet18"])
    config = resolve_config(args).model
    assert (config.cls_loss, config.focal_gamma, config.focal_alpha, config.prior_prob) == ("ohem", 1.5, -1.0, 0.0)
    assert (config.fg_iou_thresh, config.bg_iou_thresh, config.smooth_l1_beta) == (0.6, 0.3, 0.2)
    assert (config.ohem_batch, config.ohem_nms_thresh, config.ohem_fg_ratio) == (128, 0.5, 0.25)
    model = RetinaNet.from_config(config.replace(num_classes=3))
    loss = model.loss
    assert (loss.cls_loss, loss.ohem_batch, loss.ohem_nms_thresh, loss.ohem_fg_ratio) == ("ohem", 128, 0.5, 0.25)
    assert (loss.fg_iou_thresh, loss.bg_iou_thresh, loss.smooth_l1_beta) == (0.6, 0.3, 0.2)
    assert (model.head.cls_logits.bias == 0).all()  # prior 0: no prior initialisation
    # Recorded in what checkpoints store, and read back.
    assert ModelConfig.from_dict(model.config) == model.model_config


@pytest.mark.parametrize("scales,ratios", [(1, [1.0]), (2, [1.0]), (4, [0.5, 1.0, 2.0]),
                                           (2, [0.25, 0.5, 1.0, 2.0, 4.0])])
def test_anchor_flags_give_scales_times_ratios_anchors_equal_to_torchvision(scales, ratios):
    args = get_args_parser().parse_args(
        ["--scales-per-octave", str(scales), "--aspect-ratios", *map(str, ratios), "--backbone", "resnet18",
         "--num-extra-levels", "1", "--anchor-base-sizes", "16", "32", "64", "128", "--fpn-channels", "32",
         "--head-convs", "1"])
    model = RetinaNet.from_config(resolve_config(args).model.replace(num_classes=3))
    assert model.anchor_generator.num_anchors_per_location == scales * len(ratios)
    assert model.head.cls_logits.out_channels == scales * len(ratios) * 3
    sizes = default_anchor_sizes((16, 32, 64, 128), scales)
    theirs = TVAnchorGenerator(sizes, (tuple(ratios),) * len(sizes))
    image_size, feature_sizes = (128, 192), [(16, 24), (8, 12), (4, 6), (2, 3)]
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    expected = theirs(ImageList(torch.zeros(1, 3, *image_size), [image_size]), features)[0]
    torch.testing.assert_close(model.anchor_generator(image_size, feature_sizes), expected)
    # And the model runs with them: the head's outputs line up with the anchors.
    model.eval()
    with torch.no_grad():
        features = model.fpn(model.backbone(torch.zeros(1, 3, 128, 192)))
        cls_logits, _ = model.head(features)
    assert cls_logits.shape[1] == expected.shape[0]


@pytest.mark.parametrize("options,message", [
    (dict(cls_loss="hinge"), "cls_loss must be one of"), (dict(ohem_fg_ratio=1.5), "ohem_fg_ratio"),
    (dict(ohem_nms_thresh=0.0), "ohem_nms_thresh"), (dict(ohem_batch=0), "ohem_batch"),
    (dict(focal_gamma=-1.0), "focal_gamma"), (dict(focal_alpha=1.0), "focal_alpha"),
])
def test_bad_loss_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**options)
