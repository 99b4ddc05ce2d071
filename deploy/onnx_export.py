"""A RetinaNet to one ``.onnx`` file: the exporter call, free or fixed input sizes, the category table.

The file holds the whole detector (:class:`deploy.graph.DeployableRetinaNet`):

    input   image   uint8   [3, H, W]   RGB; H and W free ("height", "width") or fixed (--fixed-size)
    outputs boxes   float32 [D, 4]      x1, y1, x2, y2 in the input image's pixels
            scores  float32 [D]         sorted by decreasing score
            labels  int64   [D]         the model's contiguous labels, 0 .. num_classes - 1

Its metadata (``metadata_props``) and a JSON file beside it (``model.onnx`` -> ``model.json``)
say what the labels mean and how the graph was made: ``categories`` (label k ->
``{"id", "name"}``, a JSON list), ``input_size`` ("dynamic" or "H W"), ``score_thresh``,
``nms_thresh``, ``detections_per_img``, ``model_config`` (JSON), ``exporter``, ``opset``.

Exporter: the TorchScript-based one (``dynamo=False``). The ``torch.export``-based one
(``dynamo=True``, torch's default since 2.9) was tried first on this graph, with torch 2.14.1
and onnxscript 0.7.2: it exports, but the symbolic shape arithmetic of the resize step
becomes float32 ONNX ops, so for about 7% of image sizes the resized image is one pixel
off PyTorch's (float64) and the detections differ; computing the sizes as float64 tensors
instead makes them data-dependent, which ``torch.export`` refuses (GuardOnDataDependentSymNode
in the first conv); it cannot produce opset 17 ("No Adapter To Version 17 for Pad", so it
needs ``--opset 18``); and a tiny ResNet-18 export takes 35-55 s against 2-6 s here. The tracer
records the float64 size arithmetic as ONNX ops and torchvision's NMS has its ONNX
translation, so the traced graph matches PyTorch on every size (tests/deploy/test_export.py).
Switching exporters is the one line ``EXPORTER = "dynamo"`` (the graph code serves both).
"""
import json
import logging
import os
import tempfile
import warnings

import onnx
import torch

from deploy.graph import DeployableRetinaNet
from model.retinanet import RetinaNet
from utils.runtime.atomic_io import write_json_atomic

logger = logging.getLogger(__name__)

EXPORTER = "torchscript"  # or "dynamo": see the module docstring for why not (yet)
DEFAULT_OPSET = 17  # the lowest both NonMaxSuppression (10) and the exporter's GroupNorm/Resize need, and >= 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
FORMAT_VERSION = "retinanet-onnx-1"


def sidecar_path(onnx_path) -> str:
    """``model.onnx`` -> ``model.json``: the metadata as a file, for tools that do not read ONNX."""
    return os.path.splitext(os.fspath(onnx_path))[0] + ".json"


def export_onnx(model: RetinaNet, path, categories: list, *, opset: int = DEFAULT_OPSET, fixed_size=None,
                source: str = "", exporter: str = EXPORTER) -> dict:
    """Write ``model`` (eval mode, as loaded, not ``optimize_for``'d) to ``path`` with its metadata.

    Args:
        categories: label k -> ``{"id", "name"}`` (``model.weights.load_detector``'s second value).
        opset: ONNX opset (>= 17).
        fixed_size: ``(H, W)``: the graph takes exactly ``[3, H, W]`` images and every shape
            but the number of detections is static (TensorRT and other static runtimes);
            None: any ``H, W``.
        source: the checkpoint or weights name, recorded in the metadata.

    Returns:
        the metadata written (also in ``sidecar_path(path)``).
    """
    if len(categories) != model.num_classes:
        raise ValueError(f"{len(categories)} categories for a model with {model.num_classes} classes")
    graph = DeployableRetinaNet(model.eval()).eval()
    if fixed_size is not None:
        example_size = tuple(int(s) for s in fixed_size)
    else:
        # Any size traces the same graph; an odd one shows nothing below depends on divisibility.
        example_size = (max(1, graph.min_size - 3), max(1, min(graph.max_size, graph.min_size * 4 // 3) - 5))
    example = torch.randint(0, 256, (3, *example_size), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    metadata = {
        "format": FORMAT_VERSION,
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
        "input_size": "dynamic" if fixed_size is None else f"{example_size[0]} {example_size[1]}",
        "score_thresh": graph.score_thresh, "nms_thresh": graph.nms_thresh,
        "detections_per_img": graph.detections_per_img, "model_config": model.config,
        "exporter": exporter, "opset": opset, "source": os.fspath(source),
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad():
            run_exporter(graph, example, tmp_path, opset, dynamic=fixed_size is None, exporter=exporter)
        proto = onnx.load(tmp_path)
        onnx.checker.check_model(proto)
        del proto.metadata_props[:]
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
        proto.doc_string = (f"RetinaNet from {source}: image uint8 [3, H, W] RGB -> boxes [D, 4] xyxy pixels, "
                            f"scores [D], labels [D] (metadata 'categories' names them)")
        onnx.save(proto, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    write_json_atomic(sidecar_path(path), metadata)
    return metadata


def run_exporter(module: torch.nn.Module, example: torch.Tensor, path: str, opset: int, dynamic: bool,
                 exporter: str = EXPORTER) -> None:
    """``torch.onnx.export`` of ``module(example)`` with our input/output names, free H/W if ``dynamic``."""
    names = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset)
    if exporter == "dynamo":
        shapes = None
        if dynamic:
            shapes = {"image": {1: torch.export.Dim("height", min=1), 2: torch.export.Dim("width", min=1)}}
        torch.onnx.export(module, (example,), path, dynamo=True, dynamic_shapes=shapes, **names)
        return
    if exporter != "torchscript":
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    axes = {name: {0: "detections"} for name in OUTPUT_NAMES}
    if dynamic:
        axes[INPUT_NAME] = {1: "height", 2: "width"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(module, (example,), path, dynamo=False, dynamic_axes=axes, do_constant_folding=True,
                          **names)
    # The tracer warns about every Python value it sees; tests/deploy/test_export.py checks the graph on
    # other sizes instead. Kept for --verbose runs.
    for warning in caught:
        logger.debug("exporter: %s", str(warning.message).splitlines()[0])
