"""An exported RetinaNet (``deploy.onnx_export``) to a statically quantized INT8 ``.onnx``.

ONNX Runtime's own tooling (``onnxruntime.quantization.quantize_static``) in QDQ format:
weights int8 per output channel, activations uint8 per tensor, their ranges calibrated
by running the float graph on real images (:class:`ImageCalibrationReader`) with one of
``CALIBRATION_METHODS``. At load time ONNX Runtime fuses each ``DequantizeLinear -> Conv ->
QuantizeLinear`` into one ``QLinearConv``, which is where the speed comes from.

What stays float, by node name (the exporter names a node after the module that ran it,
``/backbone/body/layer1/layer1.0/conv1/Conv``; the pre- and post-processing that
``deploy.graph.DeployableRetinaNet.forward`` does itself are top-level nodes, ``/Resize``):

- the resize and normalisation at the input, the box decoding, clipping, top-k and NMS:
  every top-level node is left alone; only nodes inside the network's modules are candidates;
- ``keep_float`` patterns among those (``export.py --int8-keep-float``), by default none. The
  heads' last convs (``cls_logits``, ``bbox_pred``), whose outputs are the logits and box
  deltas themselves, were the suspects; on the demo model quantizing them cost no AP (docs),
  and for an 80-class model ``cls_logits`` is about 15% of the network's multiply-adds at
  512 px, so they are quantized unless a model measures otherwise.

The INT8 file carries the float file's metadata (categories, sizes, thresholds) plus
``quantization`` (JSON: format, method, calibration image count, nodes kept float), in the
graph and in the ``.json`` sidecar, so ``OnnxDetector`` and ``inference.py --onnx`` run it as
they run the float one.
"""
import json
import logging
import os
import tempfile

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      create_calibrator, quantize_static)
from onnxruntime.quantization.calibrate import save_tensors_data

from deploy.onnx_export import sidecar_path
from utils.data.image_io import ImageReadError, read_image
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.errors import UserError

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}
DEFAULT_KEEP_FLOAT = ()  # e.g. ("cls_logits", "bbox_pred") where that measures better
PERCENTILE = 99.999  # of |activation| for --calibration-method percentile
QUANTIZED_OP_TYPES = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul",
                      "MatMulInteger", "DynamicQuantizeLinear"}
# metadata_props values that deploy.onnx_export wrote as JSON (the others are plain strings)
JSON_METADATA = ("categories", "model_config", "quantization", "score_thresh", "nms_thresh", "detections_per_img",
                 "opset")
IMAGES_PER_COLLECT = 8  # calibration outputs held in memory at once (every activation of every image)


class QuantizationError(UserError):
    """An input that cannot be quantized: not an ONNX file, already quantized, no calibration images."""


def load_float_model(path) -> onnx.ModelProto:
    """The float export at ``path``; QuantizationError if it is not an ONNX file or is quantized already."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QuantizationError(f"{path}: no such file")
    try:
        proto = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError, onnx others
        raise QuantizationError(f"{path} is not an ONNX model ({type(exc).__name__}); give a .onnx written by "
                                f"export.py") from None
    if not len(proto.graph.node):
        raise QuantizationError(f"{path} is not an ONNX model (no graph); give a .onnx written by export.py")
    quantized = sorted({node.op_type for node in proto.graph.node} & QUANTIZED_OP_TYPES)
    if quantized:
        raise QuantizationError(f"{path} is already quantized ({', '.join(quantized)} nodes); quantize the float "
                                f"export instead")
    return proto


def network_nodes(proto: onnx.ModelProto, keep_float=DEFAULT_KEEP_FLOAT) -> tuple:
    """``(names to quantize, names kept float)``: the nodes inside the backbone/FPN/head modules
    (names with a module path, ``/fpn/output_convs.0/Conv``), minus those whose name contains a
    ``keep_float`` pattern. Top-level nodes (``/Resize``, ``/NonMaxSuppression``) are in neither."""
    quantize, kept = [], []
    for node in proto.graph.node:
        if not node.name.startswith("/") or node.name.count("/") < 2:
            continue  # pre/post-processing of DeployableRetinaNet.forward, or an exporter constant
        (kept if any(pattern in node.name for pattern in keep_float) else quantize).append(node.name)
    return quantize, kept


def fold_weight_identities(proto: onnx.ModelProto) -> None:
    """Feed initializers straight to their consumers instead of through ``Identity`` nodes.

    The exporter routes a parameter shared by several calls (the heads run once per pyramid
    level) through ``Identity`` nodes; the quantizer only quantizes a conv bias that is an
    initializer, and a float bias keeps ONNX Runtime from fusing the conv into QLinearConv.
    """
    initializers = {tensor.name for tensor in proto.graph.initializer}
    alias, kept = {}, []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    graph_outputs = {output.name for output in proto.graph.output}
    if graph_outputs & set(alias):
        return  # never rewire a graph output (not the case for export.py's graphs)
    for node in kept:
        for index, name in enumerate(node.input):
            if name in alias:
                node.input[index] = alias[name]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def fold_affine_into_convs(proto: onnx.ModelProto) -> int:
    """Fold each ``Conv -> Mul(scale) -> Add(shift)`` with per-channel constants into the conv.

    The trunk's FrozenBatchNorm2d exports as such a Mul and Add after its conv. ONNX Runtime
    folds them into a float conv when it loads the file, but a QDQ file keeps them as separate
    quantized ops (23 % of an R-50's INT8 time, benchmarks/onnx_profile.py). Folded here first:
    ``W' = W * s`` (per output channel) and ``b' = b * s + t``. The conv keeps its name (the node
    selection reads names) and takes over the Add's output. Returns the number of convs folded.
    """
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}

    def only_consumer(name, op_type):
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type and name not in graph_outputs else None

    def channel_constant(node, data_input, channels):
        """The node's other input as a per-channel vector, if it is a constant of shape [(1,) C, 1, 1]."""
        other = [name for name in node.input if name != data_input]
        if len(other) != 1 or other[0] not in initializers:
            return None
        value = onnx.numpy_helper.to_array(initializers[other[0]])
        return value.reshape(-1) if value.shape in ((channels, 1, 1), (1, channels, 1, 1)) else None

    def key(node):
        return node.op_type, tuple(node.input), tuple(node.output)

    removed, folded = set(), 0
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.input[1] not in initializers:
            continue
        weight = onnx.numpy_helper.to_array(initializers[conv.input[1]])
        channels = weight.shape[0]
        mul = only_consumer(conv.output[0], "Mul")
        add = only_consumer(mul.output[0], "Add") if mul is not None else None
        if add is None:
            continue
        scale = channel_constant(mul, conv.output[0], channels)
        shift = channel_constant(add, mul.output[0], channels)
        if scale is None or shift is None:
            continue
        bias = onnx.numpy_helper.to_array(initializers[conv.input[2]]) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(channels, dtype=weight.dtype)
        new_weight = (weight * scale.reshape(-1, 1, 1, 1)).astype(weight.dtype)
        new_bias = (bias * scale + shift).astype(weight.dtype)
        names = (f"{conv.output[0]}.folded_weight", f"{conv.output[0]}.folded_bias")  # unique per conv
        graph.initializer.extend([onnx.numpy_helper.from_array(new_weight, names[0]),
                                  onnx.numpy_helper.from_array(new_bias, names[1])])
        del conv.input[1:]
        conv.input.extend(names)
        conv.output[0] = add.output[0]
        removed.update((key(mul), key(add)))
        folded += 1
    kept = [node for node in graph.node if key(node) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    still_used = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(still_used)
    return folded


class ImageCalibrationReader(CalibrationDataReader):
    """The calibration images, one ``{"image": uint8 [3, H, W]}`` feed each, as the graph takes them.

    ``images``: file paths or ``uint8 [3, H, W]`` tensors. Unreadable files are skipped with a
    warning (counted in ``num_skipped``); with ``fixed_size`` (a --fixed-size export) each image
    is resized to it first, as a user of that file must.
    ``set_range`` lets :func:`calibrate` collect a few images at a time.
    """

    def __init__(self, images: list, fixed_size=None):
        self.fixed_size, self.images = fixed_size, []
        for image in images:  # read once here: quantize_static fails on a stride of unreadable images
            if isinstance(image, (str, os.PathLike)):
                try:
                    read_image(image)
                except ImageReadError as exc:
                    logger.warning("calibration: skipped %s", exc)
                    continue
            self.images.append(image)
        self.num_skipped = len(images) - len(self.images)
        self.set_range(0, len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pending = iter(self.images[start_index:end_index])

    def get_next(self):
        for image in self._pending:
            image = read_image(image) if isinstance(image, (str, os.PathLike)) else torch.as_tensor(image)
            if self.fixed_size is not None and tuple(image.shape[1:]) != tuple(self.fixed_size):
                image = F.interpolate(image[None].float(), size=tuple(self.fixed_size), mode="bilinear",
                                      align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            return {"image": np.ascontiguousarray(image.numpy())}
        return None


def _stride(method: str) -> int:
    """Images per ``collect_data`` call: IMAGES_PER_COLLECT for minmax; 1 for the histogram methods, whose
    collector stacks the images' activations into one array and so fails on images of different sizes
    (it merges the histograms across calls)."""
    return IMAGES_PER_COLLECT if method == "minmax" else 1


def network_outputs(proto: onnx.ModelProto, network: list) -> list:
    """The tensors the ``network`` nodes hand to the post-processing (the heads' per-level outputs)."""
    names = set(network)
    produced = {output for node in proto.graph.node if node.name in names for output in node.output}
    consumed = [name for node in proto.graph.node if node.name not in names for name in node.input]
    consumed += [output.name for output in proto.graph.output]
    return sorted(set(consumed) & produced)


def calibrate(prepared_path: str, network: list, reader: ImageCalibrationReader, method: str, work: str) -> str:
    """Activation ranges of the network and its input (the pre-processing's output), computed on the graph
    cut after the heads, written where ``quantize_static(calibration_cache_path=...)`` reads them.

    Cut because ONNX Runtime's calibrators otherwise also watch every post-processing tensor, which is
    empty on an image without detections (the percentile calibrator fails on it) and not quantized anyway.
    """
    proto = onnx.load(prepared_path)
    cut_path = os.path.join(work, "network.onnx")
    onnx.utils.extract_model(prepared_path, cut_path, [proto.graph.input[0].name], network_outputs(proto, network),
                             check_model=False)
    calibrator = create_calibrator(cut_path, augmented_model_path=os.path.join(work, "augmented.onnx"),
                                   calibrate_method=CALIBRATION_METHODS[method],
                                   extra_options={"percentile": PERCENTILE})
    stride = _stride(method)
    for start in range(0, len(reader), stride):
        reader.set_range(start, start + stride)
        calibrator.collect_data(reader)
    cache_path = os.path.join(work, "ranges.json")
    save_tensors_data(calibrator.compute_data(), cache_path)
    return cache_path


def quantize_int8(float_path, int8_path, calibration_images: list, method: str = "minmax",
                  keep_float=DEFAULT_KEEP_FLOAT) -> dict:
    """Write the INT8 version of the float export ``float_path`` to ``int8_path`` (and its sidecar).

    Args:
        calibration_images: image files (or ``uint8 [3, H, W]`` tensors) whose activations set the
            ranges; a few hundred like those the model will see.
        method: a key of ``CALIBRATION_METHODS``.
        keep_float: node-name patterns of network nodes to leave in float (see the module docstring).

    Returns:
        the metadata written, ``quantization`` included.
    """
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    if not len(calibration_images):
        raise QuantizationError("no calibration images")
    proto = load_float_model(float_path)
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    size = metadata.get("input_size", "dynamic")
    fixed_size = tuple(int(s) for s in size.split()) if size != "dynamic" else None
    fold_weight_identities(proto)
    fold_affine_into_convs(proto)
    to_quantize, kept = network_nodes(proto, keep_float)
    if not any(node.op_type == "Conv" and node.name in set(to_quantize) for node in proto.graph.node):
        raise QuantizationError(f"{float_path}: no convolution left to quantize (is it a detector exported by "
                                f"export.py? --int8-keep-float {' '.join(keep_float)} keeps too much?)")
    reader = ImageCalibrationReader(calibration_images, fixed_size)
    if not len(reader):
        raise QuantizationError(f"none of the {len(calibration_images)} calibration images could be read")
    folder = os.path.dirname(os.path.abspath(int8_path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".quantize.") as work:
        prepared = os.path.join(work, "float.onnx")
        onnx.save(proto, prepared)
        quantized = os.path.join(work, "int8.onnx")
        root_logger = logging.getLogger()
        level = root_logger.level  # the quantizer warns through the root logger about every shared bias
        root_logger.setLevel(max(level, logging.ERROR))
        try:
            ranges = calibrate(prepared, to_quantize + kept, reader, method, work)
            quantize_static(prepared, quantized, None, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CALIBRATION_METHODS[method], nodes_to_quantize=to_quantize,
                            calibration_cache_path=ranges)
        finally:
            root_logger.setLevel(level)
        result = onnx.load(quantized)
        quantization = {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
                        "method": method, "calibration_images": len(reader),
                        "quantized_nodes": len(to_quantize), "kept_float": list(keep_float),
                        "kept_float_nodes": len(kept)}
        metadata["quantization"] = json.dumps(quantization)
        del result.metadata_props[:]
        for key, value in metadata.items():
            entry = result.metadata_props.add()
            entry.key, entry.value = key, value
        result.doc_string = proto.doc_string + " (INT8, QDQ)"
        onnx.save(result, quantized)
        os.replace(quantized, int8_path)
    decoded = {key: json.loads(value) if key in JSON_METADATA else value for key, value in metadata.items()}
    write_json_atomic(sidecar_path(int8_path), decoded)
    logger.info("quantized %d network nodes (%d kept float: %s) with %s calibration on %d images (%d skipped)",
                len(to_quantize), len(kept), ", ".join(keep_float) or "none", method, len(reader),
                reader.num_skipped)
    return decoded
