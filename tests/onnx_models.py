"""Tiny models and images shared by the ONNX tests (test_export.py, test_onnx_inference.py)."""
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

TINY = dict(num_classes=3, backbone="resnet18", fpn_channels=32, head_convs=1, min_size=64, max_size=112,
            detections_per_img=50)
CONFIGS = {
    "plain": dict(),  # trainable-BN trunk (exported as folded BatchNormalization), P6 from C5, P3-P7
    "gn_heads": dict(head_norm="gn", num_extra_levels=1, anchor_base_sizes=(32, 64, 128, 256), size_divisible=32),
    "p6_from_p5": dict(p6_from="p5", size_divisible=32, backbone_norm="frozen_bn"),
    "torchvision": None,  # a torchvision RetinaNet state dict file through model.weights.load_detector
}
CATEGORIES = [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]


def scene(height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth random colours (blobs a few pixels wide), ``uint8 [3, H, W]``."""
    coarse = torch.rand(1, 3, height // 8 + 1, width // 8 + 1, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * 255).round().to(torch.uint8)


# Sizes multiples of neither 32 nor 2, scaled up and down by min_size 64 / max_size 112; the
# blank image scores below the threshold everywhere (set so by calibrate()).
IMAGES = {"wide": scene(75, 110, 1), "tall": scene(130, 97, 2), "panorama": scene(61, 190, 3)}
BLANK = torch.full((3, 83, 59), 128, dtype=torch.uint8)


def calibrate(model) -> None:
    """Give a random model a trained model's spread of scores and boxes, and a threshold above BLANK's.

    Random heads score every anchor alike (ties everywhere, so the order of equal scores
    would be arbitrary) and predict the anchors themselves (exact IoU ties in NMS): scale
    the logits to std 1.5 with the top 0.3% above 0, and the box deltas to std 0.2.
    """
    with torch.no_grad():
        batch, _, _ = model.transform(list(IMAGES.values()))
        features = model.fpn(model.backbone(batch))
        cls_logits, box_deltas = model.head(features)
        model.head.cls_logits.weight.mul_(1.5 / cls_logits.std())
        model.head.bbox_pred.weight.mul_(0.2 / box_deltas.std())
        model.head.cls_logits.bias.sub_(torch.quantile(model.head(features)[0].flatten(), 0.997))
        model.score_thresh = 0.0
        threshold = max(0.05, float(model([BLANK])[0]["scores"].max()) + 0.02)
    model.score_thresh = threshold
    model.model_config = model.model_config.replace(score_thresh=threshold)


def torchvision_layout_file(path) -> None:
    """A torchvision RetinaNet (ResNet-18 FPN with 32 channels, 91 COCO classes) state dict, random weights."""
    trunk = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 32,
                               extra_blocks=LastLevelP6P7(32, 32))
    torch.save(TorchvisionRetinaNet(backbone, num_classes=91).state_dict(), path)
