"""export.py and deploy/: the ONNX graph in ONNX Runtime gives PyTorch's detections, metadata, fixed sizes.

Tiny ResNet-18 models (32 FPN channels, 64-112 px) in four configurations: BatchNorm trunk
with P6 from C5 (P3-P7, padded to 128), GroupNorm heads (P3-P6, padded to 32), FrozenBN
trunk with P6 from P5, and a torchvision-layout RetinaNet file converted on load. Each is
exported once (module-scoped fixture, a few seconds each).
"""
import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from deploy.graph import DeployableRetinaNet, _resized_size
from deploy.onnx_export import DEFAULT_OPSET, export_onnx, sidecar_path
from deploy.ort_detector import OnnxDetector, OnnxInputError
from deploy.verify import compare_detections, verification_images, verify
import export
from model import build_retinanet
from model.torchvision_compat import COCO_CATEGORIES
from model.transform import ImageBatcher
from model.weights import load_detector
from onnx_models import BLANK, CATEGORIES, CONFIGS, IMAGES, TINY, calibrate, torchvision_layout_file
from utils.runtime.checkpoint import save_checkpoint


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    """SimpleNamespace(model (PyTorch, eval), categories, checkpoint, onnx (path), detector (ONNX Runtime))."""
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    if CONFIGS[request.param] is None:
        torchvision_layout_file(folder / "torchvision.pth")
        model, categories = load_detector(str(folder / "torchvision.pth"), min_size=64, max_size=112,
                                          detections_per_img=50)
        assert categories == COCO_CATEGORIES and model.model_config.p6_from == "p5"
    else:
        model, categories = build_retinanet(**TINY, **CONFIGS[request.param]).eval(), CATEGORIES
    calibrate(model)
    checkpoint = folder / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": categories,
                     "args": {}}, str(checkpoint))
    onnx_path = folder / "model.onnx"
    export_onnx(model, onnx_path, categories, source=str(checkpoint))
    return SimpleNamespace(name=request.param, model=model, categories=categories, checkpoint=checkpoint,
                           onnx=onnx_path, detector=OnnxDetector(onnx_path))


def test_onnx_runtime_gives_pytorch_detections(exported):
    """The acceptance check: same count, scores within 1e-4, boxes within 1e-2 px, paired by score order."""
    for name, image in {**IMAGES, "blank": BLANK}.items():
        with torch.no_grad():
            reference = exported.model([image])[0]
        result = exported.detector(image.numpy())
        assert result["boxes"].dtype == np.float32 and result["boxes"].shape == (len(result["scores"]), 4)
        assert result["scores"].dtype == np.float32 and result["labels"].dtype == np.int64
        assert (np.diff(result["scores"]) <= 0).all()
        comparison = compare_detections(reference, result, score_tolerance=1e-4, box_tolerance=1e-2)
        assert comparison["ok"], (name, comparison)
        if name == "blank":
            assert comparison["count"] == (0, 0)
        else:
            assert comparison["count"][0] > 0, "calibrate() should leave detections on the scenes"
            height, width = image.shape[1:]
            assert (result["boxes"] >= 0).all() and (result["boxes"][:, 0::2] <= width).all()
            assert (result["boxes"][:, 1::2] <= height).all()
            assert result["labels"].max() < exported.model.num_classes


def test_metadata_names_the_categories(exported):
    proto = onnx.load(str(exported.onnx))
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["categories"]) == exported.categories
    assert metadata["input_size"] == "dynamic" and float(metadata["score_thresh"]) == exported.model.score_thresh
    assert json.loads(metadata["model_config"]) == exported.model.config
    assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [3, "height", "width"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    sidecar = json.loads(open(sidecar_path(exported.onnx)).read())
    assert sidecar["categories"] == exported.categories == exported.detector.categories
    assert exported.detector.fixed_size is None


def test_deployable_graph_in_eager_mode_is_the_model():
    """The wrapper redoes RetinaNet.forward for one image: identical outputs in eager mode."""
    torch.manual_seed(0)
    model = build_retinanet(**TINY, size_divisible=32).eval()
    calibrate(model)
    graph = DeployableRetinaNet(model).eval()
    with torch.no_grad():
        for image in IMAGES.values():
            reference = model([image])[0]
            boxes, scores, labels = graph(image)
            assert len(scores) > 0
            torch.testing.assert_close(boxes, reference["boxes"], rtol=0, atol=1e-4)
            torch.testing.assert_close(scores, reference["scores"], rtol=0, atol=1e-6)
            assert torch.equal(labels, reference["labels"])
    with pytest.raises(ValueError, match="before RetinaNet.optimize_for"):
        DeployableRetinaNet(model.optimize_for("cpu"))


class _ResizedSize(torch.nn.Module):
    def forward(self, image):
        height, width = torch._shape_as_tensor(image)[1], torch._shape_as_tensor(image)[2]
        return torch.stack(_resized_size(height, width, 800, 1333))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter's, as export.py uses it
def test_traced_resize_size_is_pythons_float64_size(tmp_path):
    """floor(h * min(800 / short, 1333 / long)) in the graph equals ImageBatcher's, one-pixel quirks included
    (floor(97 * (800 / 97)) is 799 in float64; a float32 graph gets ~7% of sizes wrong)."""
    path = tmp_path / "size.onnx"
    torch.onnx.export(_ResizedSize(), (torch.zeros(3, 61, 80, dtype=torch.uint8),), str(path), dynamo=False,
                      input_names=["image"], dynamic_axes={"image": {1: "h", 2: "w"}}, opset_version=DEFAULT_OPSET)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batcher = ImageBatcher(min_size=800, max_size=1333).eval()
    rng = np.random.default_rng(0)
    sizes = [(97, 120), (120, 97), (480, 640), (1000, 100)] + [tuple(s) for s in rng.integers(20, 2000, (200, 2))]
    mismatches = []
    for height, width in sizes:
        got = tuple(session.run(None, {"image": np.zeros((3, height, width), np.uint8)})[0])
        # What eager mode resizes to (one channel: only the size matters).
        expected = tuple(batcher._resize(torch.zeros(1, height, width)).shape[1:])
        if got != expected:
            mismatches.append(((height, width), got, expected))
    assert not mismatches, mismatches[:5]
    assert batcher._resize(torch.zeros(1, 97, 120)).shape[1] == 799  # the quirk is really there


def test_fixed_size_export_is_static_and_refuses_other_sizes(tmp_path):
    """--fixed-size 75 110 of a model that itself resizes to exactly 72 x 100 (ModelConfig.fixed_size)."""
    torch.manual_seed(0)
    model = build_retinanet(**TINY, fixed_size=(72, 100)).eval()
    calibrate(model)
    path = tmp_path / "fixed.onnx"
    metadata = export_onnx(model, path, CATEGORIES, fixed_size=(75, 110))
    assert metadata["input_size"] == "75 110"
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 75, 110]
    detector = OnnxDetector(path)
    assert detector.fixed_size == (75, 110)
    with torch.no_grad():
        reference = model([IMAGES["wide"]])[0]
    comparison = compare_detections(reference, detector(IMAGES["wide"].numpy()))
    assert comparison["ok"] and comparison["count"][0] > 0, comparison
    with pytest.raises(OnnxInputError, match=r"tall.png is 130 x 97 \(H x W\).*exported for 75 x 110 images only"):
        detector(IMAGES["tall"].numpy(), name="tall.png")
    with pytest.raises(OnnxInputError, match="expected a uint8"):
        detector(IMAGES["wide"].numpy().astype(np.float32))


def test_onnx_runtime_folds_every_batchnorm_into_its_conv(exported):
    """No BatchNormalization in the file (the exporter folds nn.BatchNorm2d in eval mode) and, once
    ONNX Runtime has optimised it (hardware-independent level), no Mul right after a Conv: the
    FrozenBatchNorm2d scale is folded too, so the trunk runs conv (+ ReLU) only."""
    proto = onnx.load(str(exported.onnx))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(exported.onnx.with_name("optimised.onnx"))
    onnxruntime.InferenceSession(str(exported.onnx), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath).graph.node
    conv_outputs = {out for n in optimised if n.op_type in ("Conv", "FusedConv") for out in n.output}
    assert len(conv_outputs) >= 20
    assert not [n.name for n in optimised if n.op_type == "Mul" and set(n.input) & conv_outputs]


def test_compare_detections_pairs_near_ties_and_flags_differences():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]], np.float32)
    reference = {"boxes": boxes, "scores": np.array([0.9, 0.8, 0.5], np.float32), "labels": np.array([0, 1, 2])}
    # The two top scores within 1e-5 of each other come out swapped: still the same detections.
    swapped = {"boxes": boxes[[1, 0, 2]] + 0.001, "scores": np.array([0.9, 0.9 - 1e-5, 0.5], np.float32),
               "labels": np.array([1, 0, 2])}
    tied = dict(reference, scores=np.array([0.9, 0.9 - 1e-5, 0.5], np.float32))
    result = compare_detections(tied, swapped)
    assert result["ok"] and result["count"] == (3, 3) and result["box_diff"] == pytest.approx(0.001, abs=1e-6)
    assert not compare_detections(reference, swapped)["ok"]  # 0.8 vs 0.9 - 1e-5: not a tie
    assert not compare_detections(reference, dict(reference, boxes=boxes + 0.02))["ok"]
    assert not compare_detections(reference, dict(reference, labels=np.array([0, 1, 0])))["ok"]
    fewer = {key: value[:2] for key, value in reference.items()}
    assert compare_detections(reference, fewer)["count"] == (3, 2) and not compare_detections(reference, fewer)["ok"]
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    assert compare_detections(empty, empty)["ok"]


@pytest.mark.parametrize("exported", ["plain"], indirect=True)
def test_verify_reports_a_model_that_differs(exported):
    images = verification_images(3, None, 64, 112)
    sizes = [tuple(image.shape[1:]) for _, image in images]
    assert len(set(sizes)) == 3 and all(side % 32 and side % 2 for size in sizes for side in size)
    assert all(image.dtype == torch.uint8 and image.float().std() > 10 for _, image in images)  # scenes, not blank
    records = verify(exported.model, exported.detector, images)
    assert all(r["ok"] for r in records), records
    torch.manual_seed(1)
    other = build_retinanet(**TINY).eval()  # other weights, same architecture
    calibrate(other)
    bad = verify(other, exported.detector, [("wide", IMAGES["wide"])])
    assert not bad[0]["ok"]
    with pytest.raises(export.VerificationError, match="differs from PyTorch on 1 of 1 images"):
        export.report(bad, export.get_args_parser().parse_args(["--checkpoint", "x"]))
