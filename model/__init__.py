"""RetinaNet model package: the architecture, its configuration, and the one way to build and to load it.

Build a model from a configuration (random init, or ImageNet weights in the trunk)::

    model = RetinaNet.from_config(ModelConfig(num_classes=3, backbone="resnet18"), pretrained_backbone=None)
    model = build_retinanet(num_classes=3, backbone="resnet18")    # the same, the config's fields as keywords

Load a trained model (our checkpoints, torchvision RetinaNet files or weights names)::

    model, categories = load_detector("model_final.pth", score_thresh=0.3)   # model.weights

``load_detector`` also takes what ``model.weights.read_weights`` returned, for a caller that
needs the file's contents (training options, categories) before it builds the model.
A built or loaded model runs as it is; ``model.optimize_for(device)`` picks the fast paths.

Imports run one way: ``utils`` <- ``ops`` <- ``losses`` <- ``model`` <- entry scripts.
"""
from model.backbone import BACKBONES
from model.config import ModelConfig
from model.retinanet import RetinaNet
from model.weights import load_detector

__all__ = ["build_retinanet", "load_detector", "ModelConfig", "RetinaNet", "BACKBONES"]


def build_retinanet(*, pretrained_backbone=None, **options) -> RetinaNet:
    """``RetinaNet.from_config(ModelConfig(**options), pretrained_backbone)``: keywords instead of a config.

    Args:
        options: :class:`model.config.ModelConfig` fields (every one is listed in its docstring:
            backbone, pyramid, head, anchors, input sizes, post-processing, loss); the others keep
            the paper's COCO defaults (R-50, P3-P7, 800 px).
        pretrained_backbone: None (random init), a torchvision ImageNet weights tag
            ("DEFAULT", "IMAGENET1K_V1", ...) or a local ``.pth`` path.

    The model carries ``model.config``, its configuration as a plain dict, so
    ``build_retinanet(**model.config)`` rebuilds the same architecture. Trained weights
    are loaded with :func:`load_detector`, not here.
    """
    if "weights" in options:
        raise TypeError("build_retinanet builds a new model; load trained weights with "
                        "model.load_detector(weights, **options)")
    return RetinaNet.from_config(ModelConfig(**options), pretrained_backbone)
