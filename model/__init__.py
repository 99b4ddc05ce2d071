"""RetinaNet model package. ``build_retinanet`` is the one way code builds a model.

Imports run one way: ``utils`` <- ``ops`` <- ``losses`` <- ``model`` <- entry scripts.
"""
from model.backbone import BACKBONES
from model.config import ModelConfig
from model.retinanet import RetinaNet
from model.weights import load_detector

__all__ = ["build_retinanet", "load_detector", "ModelConfig", "RetinaNet", "BACKBONES"]


def build_retinanet(config: ModelConfig = None, *, weights: str = None, pretrained_backbone=None,
                    **options) -> RetinaNet:
    """Build a RetinaNet. Defaults are the paper's COCO configuration (R-50, P3-P7, 800 px).

    Args:
        config: a :class:`model.config.ModelConfig`; ``options`` are its fields (every option
            is listed in its docstring: backbone, pyramid, head, anchors, input sizes,
            post-processing, loss), replacing the config's (or the defaults') values.
        pretrained_backbone: None (random init), a torchvision ImageNet weights tag
            ("DEFAULT", "IMAGENET1K_V1", ...) or a local ``.pth`` path.
        weights: instead, a trained detector to load (see :mod:`model.weights`): one of our
            checkpoints, a torchvision RetinaNet ``.pth`` or torchvision weights name such as
            "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1". The architecture, class list
            (``model.categories``) and torchvision's settings then come from the weights, and
            every option given replaces the weights' value (an architecture option that
            contradicts them is an error). Returned in eval mode.

    The model carries ``model.config``: its configuration as a plain dict, so
    ``build_retinanet(**model.config)`` rebuilds the same architecture for a checkpoint.
    It runs as built; ``model.optimize_for(device)`` picks the fast paths for a device.
    """
    if weights is not None:
        if config is not None:
            raise TypeError("pass either config or weights, not both")
        if pretrained_backbone:
            raise ValueError("pretrained_backbone and weights exclude each other: the weights hold the backbone")
        return load_detector(weights, **options)[0]
    config = (config or ModelConfig()).replace(**options)
    return RetinaNet.from_config(config, pretrained_backbone)
