"""export.py --int8 and evaluation.py --onnx: a quantized model that finds the float model's detections,
an exported model scored exactly as its checkpoint, and the user's mistakes as one line.

A tiny ResNet-18 (onnx_models.TINY, random weights given a trained model's spread of scores by
calibrate()) on a tiny demo dataset (64 px shapes, 12 training and 6 validation images); the
slow test trains one with train.py instead and compares the APs.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import evaluation
import export
import inference
from deploy.ort_detector import OnnxDetector
from deploy.quantize import fold_affine_into_convs, fold_weight_identities, network_nodes, quantize_int8
from deploy.verify import agreement, compare_runtimes
from forked_scripts import REPO, run_forked
from model import build_retinanet
from onnx_models import TINY, calibrate, scene
from utils.data.demo_data import generate_demo_dataset
from utils.data.image_io import read_image
from utils.runtime.checkpoint import save_checkpoint

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 3, "name": "rectangle"}, {"id": 7, "name": "triangle"},
              {"id": 12, "name": "cross"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """SimpleNamespace(data, checkpoint, float (.onnx), int8 (.onnx), summary (export.main's for --int8))."""
    folder = tmp_path_factory.mktemp("int8")
    data = folder / "data"
    generate_demo_dataset(str(data), num_train=12, num_val=6, image_size=64, seed=3, show_progress=False)
    assert [c["id"] for c in json.loads((data / "annotations" / "instances_val.json").read_text())["categories"]] \
        == [c["id"] for c in CATEGORIES]
    torch.manual_seed(0)
    model = build_retinanet(**{**TINY, "num_classes": 4}).eval()
    calibrate(model)
    checkpoint = folder / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                     "args": {"data_path": str(data), "train_split": "train", "val_split": "val"}}, str(checkpoint))
    float_path, int8_path = folder / "model.onnx", folder / "model_int8.onnx"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--output", str(float_path)]))
    # Calibrated on the training split (the checkpoint's), verified on the held-out validation images.
    summary = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--int8", "--output", str(int8_path), "--verify",
         "--images", str(data / "val"), "--int8-keep-float", "cls_logits", "bbox_pred"]))
    return SimpleNamespace(folder=folder, data=data, checkpoint=checkpoint, model=model, float=float_path,
                           int8=int8_path, summary=summary)


def test_int8_model_has_quantized_convs_and_float_pre_and_post_processing(exported):
    proto = onnx.load(str(exported.int8))
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["QuantizeLinear"] > 10 and ops["DequantizeLinear"] > 10
    dequantized = {node.output[0] for node in proto.graph.node if node.op_type == "DequantizeLinear"}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    quantized = [node.name for node in convs if node.input[0] in dequantized and node.input[1] in dequantized]
    float_convs = [node.name for node in convs if node not in quantized and node.name not in quantized]
    assert any("/backbone/body/conv1/" in name for name in quantized) and any("/fpn/" in name for name in quantized)
    assert float_convs and all("cls_logits" in name or "bbox_pred" in name for name in float_convs), float_convs
    # The pre- and post-processing stay float: nothing quantized feeds the input resize or the NMS.
    by_output = {out: node for node in proto.graph.node for out in node.output}
    for node in proto.graph.node:
        if node.op_type in ("NonMaxSuppression", "TopK") or node.name == "/Resize":
            assert not any(by_output.get(name) is not None and by_output[name].op_type == "DequantizeLinear"
                           for name in node.input), node.name


def test_int8_file_carries_the_float_metadata(exported):
    float_meta = {e.key: e.value for e in onnx.load(str(exported.float)).metadata_props}
    int8_meta = {e.key: e.value for e in onnx.load(str(exported.int8)).metadata_props}
    assert {k: v for k, v in int8_meta.items() if k not in ("quantization", "source")} == \
        {k: v for k, v in float_meta.items() if k != "source"}
    quantization = json.loads(int8_meta["quantization"])
    assert quantization["format"] == "QDQ" and quantization["calibration_images"] == 12
    assert quantization["kept_float"] == ["cls_logits", "bbox_pred"]
    sidecar = json.loads((exported.folder / "model_int8.json").read_text())
    assert sidecar["categories"] == CATEGORIES and sidecar["quantization"] == quantization
    detector = OnnxDetector(exported.int8)
    assert detector.categories == CATEGORIES and detector.score_thresh == pytest.approx(exported.model.score_thresh)


def test_int8_finds_the_float_detections_on_held_out_images(exported):
    """The measure: of the float model's 20 best detections per image, the share the INT8 model
    finds again (same label, IoU >= 0.5), and the score difference of those pairs."""
    verification = exported.summary["verification"]
    assert verification["images"] == 6 and verification["reference"] > 30
    assert verification["agreement"] >= 0.8, verification
    assert verification["score_diff_mean"] < 0.05
    # The measure itself sees a real difference: the float model against a shifted copy of itself.
    image = read_image(str(sorted((exported.data / "val").iterdir())[0])).numpy()
    reference = OnnxDetector(exported.float)(image)
    shifted = {**reference, "boxes": reference["boxes"] + 1000.0}
    assert agreement(reference, reference)["matched"] == min(20, len(reference["scores"])) > 0
    assert agreement(reference, shifted)["matched"] == 0


def test_agreement_pairs_each_candidate_once_and_needs_the_same_label():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1.0, 1, 11, 11]])
    reference = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}
    one = {"boxes": boxes[:1], "scores": torch.tensor([0.7]), "labels": torch.tensor([0])}
    assert agreement(reference, one)["matched"] == 1 and agreement(reference, one)["score_diffs"] == \
        [pytest.approx(0.2)]
    other_label = {**one, "labels": torch.tensor([1])}
    assert agreement(reference, other_label)["matched"] == 0
    assert compare_runtimes(lambda image, name: reference, lambda image, name: reference,
                            [("a", torch.zeros(3, 4, 4, dtype=torch.uint8))])["agreement"] == 1.0


def test_evaluation_onnx_equals_checkpoint_and_runs_int8(exported, tmp_path):
    def evaluate(*flags):
        return evaluation.main(evaluation.get_args_parser().parse_args(
            [*flags, "--data-path", str(exported.data), "--split", "val", "--workers", "0", "--batch-size", "1",
             "--device", "cpu", "--output-dir", str(tmp_path / flags[0][2:])]))

    from_checkpoint = evaluate("--checkpoint", str(exported.checkpoint))
    from_float = evaluate("--onnx", str(exported.float))
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert from_float[key] == pytest.approx(from_checkpoint[key], abs=1e-4), key
    results = {flag: json.loads((tmp_path / flag / "results.json").read_text()) for flag in ("checkpoint", "onnx")}
    assert len(results["onnx"]) == len(results["checkpoint"]) > 50
    for a, b in zip(*(sorted(r, key=lambda d: (d["image_id"], -d["score"])) for r in results.values())):
        assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) < 1e-3
    int8_path = tmp_path / "int8.onnx"
    os.link(exported.int8, int8_path)  # evaluated from another folder: the output goes to --output-dir
    from_int8 = evaluation.main(evaluation.get_args_parser().parse_args(
        ["--onnx", str(int8_path), "--data-path", str(exported.data), "--split", "val", "--workers", "0",
         "--output-dir", str(tmp_path / "int8")]))
    assert 0 <= from_int8["AP"] <= 1 and (tmp_path / "int8" / "metrics.json").is_file()


def test_int8_model_runs_with_inference_onnx(exported, tmp_path):
    summary = inference.main(inference.get_args_parser().parse_args(
        ["--onnx", str(exported.int8), "--input", str(exported.data / "val"), "--output-dir", str(tmp_path / "out"),
         "--workers", "0", "--device", "cpu", "--score-threshold", str(exported.model.score_thresh)]))
    assert summary["num_images"] == 6 and summary["num_detections"] > 0


def test_user_errors_are_one_line(exported, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    not_onnx = tmp_path / "weights.onnx"
    not_onnx.write_text("this is not a model\n" * 20)
    out = str(tmp_path / "out.onnx")
    cases = [
        (["--checkpoint", exported.checkpoint, "--int8", "--calibration-images", empty, "--output", out],
         f"--calibration-images {empty}: no image files"),
        (["--onnx", not_onnx, "--int8", "--calibration-images", exported.data / "train", "--output", out],
         "is not an ONNX model"),
        (["--onnx", exported.int8, "--int8", "--calibration-images", exported.data / "train", "--output", out],
         "is already quantized"),
        (["--onnx", exported.float, "--output", out], "add --int8"),
    ]
    for run, (_, expected) in zip(run_forked("export.py", [argv for argv, _ in cases]), cases):
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        assert expected in lines[0], lines[0]
    assert not os.path.exists(out)


def test_network_nodes_leave_pre_and_post_processing_alone(exported):
    proto = onnx.load(str(exported.float))
    quantize, kept = network_nodes(proto, ("cls_logits",))
    assert all(name.count("/") >= 2 for name in quantize + kept)
    assert kept and all("cls_logits" in name for name in kept)
    assert not any(name.startswith(("/Resize", "/NonMaxSuppression", "/TopK")) for name in quantize)
    assert network_nodes(proto, ())[1] == []


@pytest.mark.slow
def test_trained_model_int8_verify_reports_both_aps(tmp_path):
    """A tiny model trained by train.py: export.py --int8 --verify --data-path gives the float AP that
    evaluation.py --checkpoint gives (to 1e-4) and an INT8 AP close to it."""
    data = tmp_path / "data"
    generate_demo_dataset(str(data), num_train=16, num_val=6, image_size=64, seed=1, show_progress=False)
    train = [sys.executable, os.path.join(REPO, "train.py"), "--data-path", str(data), "--train-split", "train",
             "--val-split", "val", "--output-dir", str(tmp_path / "out"), "--workers", "0", "--batch-size", "4",
             "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0", "--warmup-iters", "2", "--epochs", "3",
             "--eval-interval", "0", "--num-threads", "1", "--backbone", "resnet18", "--pretrained-backbone",
             "none", "--fpn-channels", "32", "--head-convs", "1", "--head-norm", "gn", "--num-extra-levels", "1",
             "--anchor-base-sizes", "16", "32", "64", "128", "--min-size", "64", "--max-size", "64",
             "--prior-prob", "0.3"]
    result = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "model_final.pth"
    summary = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--int8", "--output", str(tmp_path / "int8.onnx"), "--verify",
         "--images", str(data / "val"), "--data-path", str(data), "--split", "val"]))
    from_checkpoint = evaluation.main(evaluation.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--workers", "0", "--batch-size", "1", "--device", "cpu",
         "--output-dir", str(tmp_path / "eval")]))
    assert summary["ap"]["float"]["AP"] == pytest.approx(from_checkpoint["AP"], abs=1e-4)
    assert from_checkpoint["AP50"] > 0
    assert abs(summary["ap"]["int8"]["AP"] - summary["ap"]["float"]["AP"]) < 0.05
    assert summary["verification"]["agreement"] >= 0.7, summary["verification"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_takes_images_of_different_sizes(exported, tmp_path, method):
    """ONNX Runtime's histogram calibrators stack a batch's activations: one image per batch for them;
    minmax takes up to 8 at a time (here 11: two batches, the second short)."""
    scenes = [scene(64 + 9 * (i % 4), 90 - 7 * (i % 3), seed=20 + i) for i in range(11 if method == "minmax" else 3)]
    metadata = quantize_int8(exported.float, tmp_path / "int8.onnx", scenes, method)
    assert metadata["quantization"]["method"] == method
    assert metadata["quantization"]["calibration_images"] == len(scenes)
    result = OnnxDetector(tmp_path / "int8.onnx")(scenes[0].numpy())
    assert len(result["scores"]) > 0
    # By default every conv of the network is quantized, the heads' last ones included.
    proto = onnx.load(str(tmp_path / "int8.onnx"))
    dequantized = {node.output[0] for node in proto.graph.node if node.op_type == "DequantizeLinear"}
    convs = [node for node in proto.graph.node if node.op_type == "Conv"]
    assert len(convs) > 20 and all(node.input[1] in dequantized for node in convs)


def test_frozen_batchnorm_affine_is_folded_into_the_convs_exactly(tmp_path):
    """A FrozenBatchNorm2d trunk exports each BN as Mul + Add after its conv: folded before quantizing,
    the float graph computes the same detections with one Mul/Add pair fewer per BN."""
    torch.manual_seed(0)
    model = build_retinanet(**{**TINY, "num_classes": 4, "backbone_norm": "frozen_bn"}).eval()
    calibrate(model)
    for module in model.modules():  # BN statistics that are not the identity, so a wrong fold shows
        if type(module).__name__ == "FrozenBatchNorm2d":
            module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "frozen.onnx"
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(_checkpoint(model, tmp_path)),
                                                     "--output", str(path)]))
    proto = onnx.load(str(path))
    fold_weight_identities(proto)
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    folded = fold_affine_into_convs(proto)
    onnx.checker.check_model(proto)
    ops = [Counter(node.op_type for node in graph.node) for graph in (plain.graph, proto.graph)]
    # ResNet-18: 20 BatchNorms (17 after convs of the blocks, 3 in the downsample branches)
    assert folded == 20 and ops[0]["Mul"] - ops[1]["Mul"] == 20 and ops[0]["Add"] - ops[1]["Add"] == 20
    assert not any("bn" in node.name and node.op_type in ("Mul", "Add") for node in proto.graph.node)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion of its own
    image = scene(64, 96, seed=5).numpy()
    outputs = [onnxruntime.InferenceSession(m.SerializeToString(), options).run(None, {"image": image})
               for m in (plain, proto)]
    assert outputs[0][1].size > 0
    for before, after in zip(*outputs):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-3)


def _checkpoint(model, folder):
    path = folder / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                     "args": {}}, str(path))
    return path
