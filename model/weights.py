"""Load detector weights from any source: our checkpoints, torchvision RetinaNet files, torchvision weight names.

This is the one model loader of the repository: :func:`load_detector` turns a weights spec into
a model in eval mode and its category list. A caller that needs what the file holds before it
builds the model (the training options of a checkpoint, its categories, its configuration)
reads it once with :func:`read_weights` and passes that :class:`WeightsSource` to
:func:`load_detector`. Training (``--weights``, with :func:`load_pretrained_for_finetuning`),
evaluation, inference, export and the tools all go through these. To build a new model from a
configuration instead, see :meth:`model.retinanet.RetinaNet.from_config`.

A weights spec is one of
  * a checkpoint of this repository (``{"model", "model_config", "categories", ...}``), also
    those written before execution settings left the configuration;
  * a ``.pth`` torchvision RetinaNet state dict (or a torchvision references checkpoint
    ``{"model": state_dict, ...}``), converted by :mod:`model.torchvision_compat`;
  * the name of torchvision's published weights, e.g. ``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"``,
    ``"RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1"`` or a builder name (``"retinanet_resnet50_fpn_v2"``)
    for its default weights; downloaded once into torch's hub cache.

Every unusable file fails with one :class:`utils.runtime.checkpoint.CheckpointError` line naming it.
"""
import logging
import os
from dataclasses import dataclass

import torch
import torchvision

from model.config import ARCHITECTURE_FIELDS, ModelConfig
from model.head import prior_bias
from model.retinanet import RetinaNet
from model.torchvision_compat import (BACKBONE_BN_EPS, COCO_CATEGORIES, NUM_TORCHVISION_COCO_CLASSES,
                                      convert_torchvision_state_dict, is_torchvision_retinanet_state_dict)
from utils.runtime.checkpoint import CheckpointError, WeightsFileNotFoundError, load_state_dict_checked, torch_load
from utils.runtime.errors import ConfigError
from utils.runtime.hub import WeightsUnavailableError, fetch_published_weights  # noqa: F401  (part of this module's API)

logger = logging.getLogger(__name__)

_TORCHVISION_RETINANET_WEIGHTS = ("RetinaNet_ResNet50_FPN_Weights", "RetinaNet_ResNet50_FPN_V2_Weights")
_TORCHVISION_RETINANET_BUILDERS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")
# torchvision runs these weights with FrozenBatchNorm eps 0 (overwrite_eps in its builder).
_ZERO_EPS_WEIGHTS = {"RetinaNet_ResNet50_FPN_Weights.COCO_V1"}
CLASSIFIER_KEYS = ("head.cls_logits.weight", "head.cls_logits.bias")


class ArchitectureConflict(ConfigError):
    """An option given explicitly that contradicts the architecture of the weights being loaded."""

    def __init__(self, field: str, given, weights_value, source: str):
        super().__init__(f"{field}={given!r} conflicts with the architecture of {source} ({field}={weights_value!r}); "
                         f"leave it out to take the weights' value")
        self.field, self.given, self.weights_value, self.source = field, given, weights_value, source


@dataclass
class WeightsSource:
    """Weights in this repository's layout plus what is needed to build and describe the model."""
    state_dict: dict
    config: ModelConfig
    categories: list  # label k -> {"id", "name"}
    name: str  # the file or weights name, for messages
    train_args: dict = None  # our checkpoints: the options of the run that wrote them (data path, splits, ...)

    @property
    def model_config(self) -> dict:
        return self.config.to_dict()


def configure_from_weights(weights_config: ModelConfig, overrides: dict, source: str,
                           fixed=ARCHITECTURE_FIELDS) -> ModelConfig:
    """``weights_config`` with ``overrides`` applied; every override counts, also one equal to a default.

    A ``fixed`` field (the architecture: shapes and the meaning of the weights) given a
    different value raises :class:`ArchitectureConflict` naming it.
    """
    for field in fixed:
        if field in overrides and _comparable(overrides[field]) != getattr(weights_config, field):
            raise ArchitectureConflict(field, overrides[field], getattr(weights_config, field), source)
    return weights_config.replace(**overrides)


def _comparable(value):
    """An option value as ModelConfig stores it (tuples, None for "none")."""
    if isinstance(value, list):
        return tuple(value)
    return None if value == "none" else value


def load_detector(spec, map_location="cpu", what: str = "weights file", **overrides):
    """Build the model a weights spec describes and load its weights.

    Args:
        spec: see the module docstring; or the :class:`WeightsSource` :func:`read_weights` returned.
        what: how messages name the file ("weights file", "checkpoint") when it is read here.
        overrides: :class:`model.config.ModelConfig` fields replacing the weights' own
            (``score_thresh``, ``min_size``, ``detections_per_img``, ``box_loss``, ...). Each one
            given is applied, whatever its value; one that changes the architecture (or the
            class count) is an :class:`ArchitectureConflict`.

    Returns:
        ``(model, categories)``: the model in eval mode on ``map_location`` (carrying
        ``model.categories``), and label k -> ``categories[k]`` = ``{"id", "name"}``.
    """
    source = spec if isinstance(spec, WeightsSource) else read_weights(spec, map_location, what)
    config = configure_from_weights(source.config, overrides, source.name, ARCHITECTURE_FIELDS + ("num_classes",))
    model = RetinaNet.from_config(config)
    load_state_dict_checked(model, _fill_bn_counters(source.state_dict, model), source.name)
    model.categories = source.categories
    return model.to(map_location).eval(), source.categories


def read_weights(spec: str, map_location="cpu", what: str = "weights file") -> WeightsSource:
    """Resolve a spec to a :class:`WeightsSource` (our layout, configuration, categories)."""
    if os.path.isfile(spec):
        return _read_file(spec, map_location, what)
    if os.path.sep in spec or spec.endswith((".pth", ".pt")):
        raise WeightsFileNotFoundError(f"{what} not found: {spec}")
    weights = resolve_torchvision_weights(spec)
    name = f"{type(weights).__name__}.{weights.name}"
    tv_state = fetch_published_weights(weights, "detection weights", "pass a local copy with --weights PATH",
                                       map_location)
    eps = 0.0 if name in _ZERO_EPS_WEIGHTS else BACKBONE_BN_EPS
    return _from_torchvision(tv_state, name, eps)


def resolve_torchvision_weights(name: str):
    """``"RetinaNet_ResNet50_FPN_Weights.COCO_V1"`` or ``"retinanet_resnet50_fpn"`` -> torchvision weights enum."""
    try:
        if name in _TORCHVISION_RETINANET_BUILDERS:
            return torchvision.models.get_model_weights(name).DEFAULT
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"weights {name!r} are neither a file nor torchvision weights "
                              f"(e.g. {_TORCHVISION_RETINANET_WEIGHTS[0]}.COCO_V1): {exc}") from None
    if type(weights).__name__ not in _TORCHVISION_RETINANET_WEIGHTS:
        raise CheckpointError(f"{name} are torchvision weights for another model; RetinaNet weights are "
                              f"{' or '.join(w + '.COCO_V1' for w in _TORCHVISION_RETINANET_WEIGHTS)}")
    return weights


def _read_file(path: str, map_location, what: str) -> WeightsSource:
    content = torch_load(path, what, map_location)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict or checkpoint")
    if "model" in content and "model_config" in content:
        try:
            config = ModelConfig.from_dict(content["model_config"], source=f"{path}'s model_config")
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its model_config cannot build a model: {exc}") from None
        categories = content.get("categories") or _numbered_categories(config.num_classes)
        return WeightsSource(content["model"], config, list(categories), path, dict(content.get("args") or {}))
    # torchvision's references save {"model": state_dict, "optimizer": ..., "args": ...}.
    state = content["model"] if isinstance(content.get("model"), dict) else content
    if is_torchvision_retinanet_state_dict(state):
        # The published v1 COCO file runs with eps 0 in torchvision; recognised by its download name.
        zero_eps = os.path.basename(path) == os.path.basename(
            torchvision.models.detection.RetinaNet_ResNet50_FPN_Weights.COCO_V1.url)
        return _from_torchvision(state, path, 0.0 if zero_eps else BACKBONE_BN_EPS)
    raise CheckpointError(f"{path} is not RetinaNet weights: {_describe(state)}")


def _from_torchvision(tv_state: dict, name: str, eps: float) -> WeightsSource:
    coco = _torchvision_num_classes(tv_state) == NUM_TORCHVISION_COCO_CLASSES
    state, config = convert_torchvision_state_dict(tv_state, coco_contiguous=coco, backbone_bn_eps=eps, source=name)
    categories = COCO_CATEGORIES if coco else _numbered_categories(config["num_classes"])
    return WeightsSource(state, ModelConfig(**config), [dict(c) for c in categories], name)


def _torchvision_num_classes(tv_state: dict):
    for key, value in tv_state.items():
        if key.endswith("classification_head.cls_logits.bias"):
            box_key = key.replace("classification_head.cls_logits", "regression_head.bbox_reg")
            num_anchors = tv_state[box_key].shape[0] // 4 if box_key in tv_state else 9
            return value.shape[0] // max(num_anchors, 1)
    return None


def _numbered_categories(num_classes) -> list:
    return [{"id": k, "name": f"class_{k}"} for k in range(num_classes or 0)]


def _describe(state: dict) -> str:
    """Say what a state dict that is not a RetinaNet looks like."""
    keys = list(state)
    if any(k.startswith(("rpn.", "roi_heads.")) for k in keys):
        return "it is a two-stage detector (Faster/Mask R-CNN: it has rpn.* and roi_heads.* keys)"
    if "fc.weight" in state and hasattr(state["fc.weight"], "shape"):
        return f"it is an image classifier (fc.weight of shape {tuple(state['fc.weight'].shape)}, no detection head)"
    if any(k.startswith("head.cls_logits") for k in keys):
        return "it has this repository's weights but no 'model_config' to rebuild the model"
    return (f"expected a checkpoint of this repository ('model' + 'model_config') or torchvision RetinaNet keys "
            f"(backbone.body.*, backbone.fpn.*, head.classification_head.*); found {len(keys)} keys "
            f"such as {keys[:3]}")


def _fill_bn_counters(state: dict, model: torch.nn.Module) -> dict:
    """A model with trainable BatchNorm expects ``num_batches_tracked``, which frozen-BN weights lack."""
    own = model.state_dict()
    missing = {k: torch.zeros_like(own[k]) for k in own if k.endswith("num_batches_tracked") and k not in state}
    return {**state, **missing} if missing else state


def load_pretrained_for_finetuning(model: torch.nn.Module, spec, target_categories: list) -> dict:
    """Initialise ``model`` from other weights for fine-tuning on ``target_categories``.

    Every tensor of the source whose name and shape fit is loaded, except the final
    classifier ``head.cls_logits``: its rows (for every anchor) are copied for target
    categories whose name matches a source category (case-insensitive) and freshly
    initialised (weights N(0, 0.01), bias at the prior, as in a new head) for the others.

    Args:
        model: built for the target dataset, ``model.num_classes == len(target_categories)``.
        spec: our checkpoint, a torchvision RetinaNet file or torchvision weights name
            (or the :class:`WeightsSource` already read from one).
        target_categories: label k -> ``{"name": ...}`` (or plain name strings).

    Returns:
        a report: "loaded", "reinitialised", "skipped" (key: reason), "unused" (source keys
        the model lacks), "copied_classes" {target name: source name}, "new_classes" [names].
    """
    names = [c if isinstance(c, str) else c["name"] for c in target_categories]
    if len(names) != model.num_classes:
        raise ValueError(f"model has {model.num_classes} classes but {len(names)} target categories were given")
    source = spec if isinstance(spec, WeightsSource) else read_weights(spec)
    own = model.state_dict()
    new_state = dict(own)
    report = {"loaded": [], "reinitialised": [], "skipped": [], "unused": [], "copied_classes": {},
              "new_classes": []}
    for key, value in own.items():
        if key in CLASSIFIER_KEYS:
            continue
        if key not in source.state_dict:
            if not key.endswith("num_batches_tracked"):
                report["reinitialised"].append(key)
            continue
        if source.state_dict[key].shape != value.shape:
            report["skipped"].append(f"{key}: source {tuple(source.state_dict[key].shape)} "
                                     f"vs model {tuple(value.shape)}")
            continue
        new_state[key] = source.state_dict[key].to(value.dtype)
        report["loaded"].append(key)
    report["unused"] = [k for k in source.state_dict if k not in own]

    weight, bias = _classifier_rows(model, source, names, report)
    new_state["head.cls_logits.weight"], new_state["head.cls_logits.bias"] = weight, bias
    model.load_state_dict(new_state)
    logger.info("fine-tuning from %s: loaded %d tensors, re-initialised %d, skipped %d (shape), %d unused",
                source.name, len(report["loaded"]), len(report["reinitialised"]), len(report["skipped"]),
                len(report["unused"]))
    for line in report["skipped"]:
        logger.info("  skipped %s", line)
    logger.info("classifier: %d classes copied from the source (%s), %d new (%s)",
                len(report["copied_classes"]), ", ".join(report["copied_classes"]) or "-",
                len(report["new_classes"]), ", ".join(report["new_classes"]) or "-")
    return report


def _classifier_rows(model, source: WeightsSource, names: list, report: dict):
    """New ``head.cls_logits`` weight ``[A*K, C, 3, 3]`` and bias ``[A*K]``, channel ``a * K + k``."""
    own_weight, num_classes = model.head.cls_logits.weight, len(names)
    num_anchors = own_weight.shape[0] // num_classes
    prior_prob = model.model_config.prior_prob if getattr(model, "model_config", None) else 0.01
    weight = torch.empty_like(own_weight.detach()).normal_(std=0.01)
    weight = weight.view(num_anchors, num_classes, *own_weight.shape[1:])
    bias = torch.full((num_anchors, num_classes), prior_bias(prior_prob),
                      dtype=own_weight.dtype, device=own_weight.device)

    source_weight = source.state_dict.get("head.cls_logits.weight")
    source_bias = source.state_dict.get("head.cls_logits.bias")
    source_names = {c["name"].strip().lower(): j for j, c in enumerate(source.categories or [])}
    usable = (source_weight is not None and source_bias is not None and source_names
              and source_weight.shape[0] == num_anchors * len(source.categories)
              and source_weight.shape[1:] == own_weight.shape[1:])
    if source_weight is not None and not usable:
        report["skipped"].append(f"head.cls_logits.weight: source {tuple(source_weight.shape)} with "
                                 f"{len(source.categories or [])} categories does not fit {num_anchors} anchors "
                                 f"x {tuple(own_weight.shape[1:])}; every class re-initialised")
    for k, name in enumerate(names):
        j = source_names.get(name.strip().lower()) if usable else None
        if j is None:
            report["new_classes"].append(name)
            continue
        source_rows = source_weight.view(num_anchors, len(source.categories), *source_weight.shape[1:])
        weight[:, k] = source_rows[:, j].to(weight)
        bias[:, k] = source_bias.view(num_anchors, -1)[:, j].to(bias)
        report["copied_classes"][name] = source.categories[j]["name"]
    if report["new_classes"]:
        report["reinitialised"].extend(CLASSIFIER_KEYS)  # partly: the rows of the new classes
    return weight.reshape_as(own_weight), bias.reshape(-1)
