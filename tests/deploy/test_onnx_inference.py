"""export.py and inference.py --onnx end to end: the same detections.json as --checkpoint, bad inputs as one
line, docs/deploy.md's onnxruntime-only snippet, execution providers and the ONNX benchmark at a toy size."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

import export
import inference
from benchmarks import onnx_benchmark, onnx_profile
from deploy.onnx_export import sidecar_path
from deploy.ort_detector import OnnxDetector, execution_providers
from deploy.verify import compare_detections
from forked_scripts import REPO, run_forked
from model import build_retinanet
from onnx_models import BLANK, CATEGORIES, IMAGES, TINY, calibrate
from utils.runtime.checkpoint import save_checkpoint
from utils.runtime.errors import UserError


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A calibrated tiny model's checkpoint, exported by export.py (free size, verified) and --fixed-size 75 110."""
    folder = tmp_path_factory.mktemp("onnx_cli")
    torch.manual_seed(0)
    model = build_retinanet(**TINY).eval()
    calibrate(model)
    checkpoint = folder / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                     "args": {}}, str(checkpoint))
    images = folder / "images"
    images.mkdir()
    for name, image in {**IMAGES, "blank": BLANK}.items():  # PNG: the decoded pixels are the tensors'
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(images / f"{name}.png")
    summary = export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--output", str(folder / "model.onnx"), "--verify", "--images",
         str(images)]))
    export.main(export.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--output", str(folder / "fixed.onnx"), "--fixed-size", "75", "110"]))
    return SimpleNamespace(model=model, checkpoint=checkpoint, onnx=folder / "model.onnx", fixed=folder / "fixed.onnx",
                           images=images, folder=folder, summary=summary)


def test_export_cli_verifies_every_image(plain):
    records = {r["name"]: r for r in plain.summary["verification"]}
    assert set(records) == {"wide.png", "tall.png", "panorama.png", "blank.png"}
    assert all(r["ok"] for r in records.values()), records
    assert records["blank.png"]["count"] == (0, 0) and records["wide.png"]["count"][0] > 0
    assert json.loads(Path(sidecar_path(plain.onnx)).read_text())["categories"] == CATEGORIES


def _detections(record: dict) -> dict:
    detections = record["detections"]
    return {"boxes": np.array([d["box"] for d in detections], np.float64).reshape(-1, 4),
            "scores": np.array([d["score"] for d in detections], np.float64),
            "labels": np.array([[c["id"] for c in CATEGORIES].index(d["category_id"]) for d in detections])}


def test_inference_onnx_writes_the_checkpoints_detections_json(plain, tmp_path):
    threshold = str(plain.model.score_thresh)  # every detection the model outputs
    for source, flag in ((plain.checkpoint, "--checkpoint"), (plain.onnx, "--onnx")):
        inference.main(inference.get_args_parser().parse_args(
            [flag, str(source), "--input", str(plain.images), "--output-dir", str(tmp_path / flag[2:]),
             "--score-threshold", threshold, "--workers", "0", "--device", "cpu"]))
    eager, onnx_run = ({r["file_name"]: r for r in json.loads((tmp_path / name / "detections.json").read_text())}
                       for name in ("checkpoint", "onnx"))
    assert set(eager) == set(onnx_run) == {"wide.png", "tall.png", "panorama.png", "blank.png"}
    for file_name, record in eager.items():
        other = onnx_run[file_name]
        assert (record["width"], record["height"]) == (other["width"], other["height"])
        assert [(d["category_id"], d["category_name"]) for d in record["detections"]] == \
            [(d["category_id"], d["category_name"]) for d in other["detections"]]
        # detections.json rounds scores to 4 and boxes to 2 decimals: values within the tolerance
        # round to at most one step apart.
        comparison = compare_detections(_detections(record), _detections(other), 1e-4 + 1e-9, 1e-2 + 1e-9)
        assert comparison["ok"], (file_name, comparison)
        assert (len(record["detections"]) == 0) == (file_name == "blank.png")
        assert (tmp_path / "onnx" / other["output_file"]).is_file()


def test_the_onnx_path_tiles_like_the_pytorch_one(plain, tmp_path):
    """--tile 64 (the model's min_size: windows are not resized): ONNX Runtime runs each window, the
    tiling and merge run around it; the detections match the eager model's, tiled the same way."""
    threshold = str(plain.model.score_thresh)
    runs = {}
    for source, flag in ((plain.checkpoint, "--checkpoint"), (plain.onnx, "--onnx")):
        summary = inference.main(inference.get_args_parser().parse_args(
            [flag, str(source), "--input", str(plain.images), "--output-dir", str(tmp_path / flag[2:]),
             "--score-threshold", threshold, "--workers", "0", "--device", "cpu", "--tile", "64",
             "--tile-overlap", "0.3"]))
        assert summary["tile"] == 64
        runs[flag] = {r["file_name"]: r for r in json.loads((tmp_path / flag[2:] / "detections.json").read_text())}
    untiled = inference.main(inference.get_args_parser().parse_args(
        ["--onnx", str(plain.onnx), "--input", str(plain.images / "tall.png"), "--output-dir", str(tmp_path / "plain"),
         "--score-threshold", threshold, "--workers", "0", "--device", "cpu"]))
    assert untiled["tile"] == 0
    eager, onnx_run = runs["--checkpoint"], runs["--onnx"]
    assert set(eager) == set(onnx_run) == {"wide.png", "tall.png", "panorama.png", "blank.png"}
    for file_name, record in eager.items():
        comparison = compare_detections(_detections(record), _detections(onnx_run[file_name]), 1e-4 + 1e-9,
                                        1e-2 + 1e-9)
        assert comparison["ok"], (file_name, comparison)
    assert len(eager["tall.png"]["detections"]) > 0
    assert _detections(eager["tall.png"])["boxes"].tolist() != \
        _detections(json.loads((tmp_path / "plain" / "detections.json").read_text())[0])["boxes"].tolist()


def test_a_fixed_size_export_cannot_tile_other_windows(plain, tmp_path):
    with pytest.raises(UserError, match=r"exported graph takes 75 x 110 inputs only, not windows of 64 x 64"):
        inference.main(inference.get_args_parser().parse_args(
            ["--onnx", str(plain.fixed), "--input", str(plain.images / "wide.png"), "--output-dir",
             str(tmp_path / "out"), "--workers", "0", "--device", "cpu", "--tile", "64"]))


@pytest.mark.slow  # several processes, seconds each: out of the edit-test loop
def test_bad_inputs_stop_with_one_line(plain, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(plain.onnx.read_bytes()[:4096])
    foreign = tmp_path / "identity.onnx"
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    classifier = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), classifier)
    tall = plain.images / "tall.png"
    out = ["--output-dir", tmp_path / "out", "--workers", "0", "--overwrite"]
    inference_cases = [
        (["--onnx", tmp_path / "missing.onnx", "--input", tall, *out], r"ONNX model not found: .*missing\.onnx"),
        (["--onnx", corrupt, "--input", tall, *out], r"corrupt\.onnx is not a usable ONNX model"),
        (["--onnx", foreign, "--input", tall, *out], r"identity\.onnx is not a detector exported by export\.py"),
        (["--onnx", plain.fixed, "--input", tall, *out],
         r"is 130 x 97 \(H x W\) but .*fixed\.onnx was exported for 75 x 110 images only"),
        (["--onnx", plain.onnx, "--input", tall, "--amp", *out], r"--amp applies to PyTorch models"),
    ]
    export_cases = [
        (["--checkpoint", classifier, "--output", tmp_path / "x.onnx"], r"resnet18\.pth is not RetinaNet weights"),
        (["--checkpoint", plain.onnx, "--output", tmp_path / "x.onnx"], r"checkpoint .*model\.onnx is unusable"),
        (["--checkpoint", plain.checkpoint, "--opset", "12"], r"--opset 12: choose 17 to 20"),
        (["--checkpoint", plain.checkpoint, "--output", tmp_path / "f.onnx", "--fixed-size", "75", "110", "--verify",
          "--images", tall], r"tall\.png is 130 x 97 \(H x W\) but .*f\.onnx was exported for 75 x 110"),
    ]
    for script, cases in (("inference.py", inference_cases), ("export.py", export_cases)):
        runs = run_forked(script, [argv for argv, _ in cases])
        for (argv, pattern), run in zip(cases, runs):
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 1 and "Traceback" not in run.stderr, (argv, run.stderr[-2000:])
            assert lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), (argv, lines[-1])
            assert not [line for line in lines if line.startswith("error: ")][:-1]


def readme_snippet() -> str:
    """The Python block of docs/deploy.md (running the file without this repository), as written there."""
    page = (Path(REPO) / "docs" / "deploy.md").read_text()
    section = page.split("\n## Running the file without this repository", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_with_onnxruntime_numpy_and_pillow_alone(plain, tmp_path):
    code = readme_snippet()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    shutil.copy(plain.onnx, tmp_path / "model.onnx")
    Image.fromarray(IMAGES["wide"].permute(1, 2, 0).numpy()).save(tmp_path / "photo.jpg", quality=95)
    blocker = "import sys\nfor name in ('torch', 'torchvision'):\n    sys.modules[name] = None  # import fails\n"
    result = subprocess.run([sys.executable, "-c", blocker + code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    detector = OnnxDetector(tmp_path / "model.onnx")
    with Image.open(tmp_path / "photo.jpg") as photo:  # the same decoder as the snippet
        pixels = np.asarray(ImageOps.exif_transpose(photo).convert("RGB")).transpose(2, 0, 1)
    output = detector(pixels)
    expected = [f"{CATEGORIES[label]['name']} {round(float(score), 3)} {box.round(1).tolist()}"
                for box, score, label in zip(output["boxes"], output["scores"], output["labels"]) if score >= 0.5]
    assert expected and result.stdout.splitlines() == expected


def test_execution_providers():
    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    assert execution_providers("auto")[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert execution_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    else:
        with pytest.raises(UserError, match="no CUDA execution provider.*onnxruntime-gpu"):
            execution_providers("cuda")
    with pytest.raises(UserError, match="choose one of auto, cpu, cuda"):
        execution_providers("tpu")


@pytest.mark.slow
def test_onnx_benchmark_runs_end_to_end(tmp_path):
    args = onnx_benchmark.get_args_parser().parse_args(
        ["--backbone", "resnet18", "--image-size", "32", "48", "--size-divisible", "32", "--num-classes", "3",
         "--iters", "1", "--repeats", "1", "--warmup", "1", "--fresh-batch-size", "2", "--train-batch-size", "1",
         "--threads", "2",
         "--output", str(tmp_path / "bench.json")])
    report = onnx_benchmark.main(args)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["conditions"] == ["fresh", "training"] and saved["fresh"]["batch_size"] == 2
    for condition in ("fresh", "training"):
        for name in ("onnxruntime", "ours", "torchvision"):
            assert report[condition][name]["images_per_s"] > 0
        ratio = report[condition]["onnxruntime"]["images_per_s"] / report[condition]["ours"]["images_per_s"]
        assert report[condition]["onnxruntime/ours"] == pytest.approx(ratio)


@pytest.mark.slow
def test_onnx_profile_splits_the_time_by_operator_type(tmp_path):
    args = onnx_profile.get_args_parser().parse_args(
        ["--backbone", "resnet18", "--num-classes", "3", "--image-size", "64", "--threads", "2", "--runs", "2",
         "--warmup", "1", "--output", str(tmp_path / "profile.json")])
    report = onnx_profile.main(args)
    assert json.loads((tmp_path / "profile.json").read_text()) == json.loads(json.dumps(report))
    float_ops, int8_ops = (report["files"][name]["by_op"] for name in ("model.onnx", "model_int8.onnx"))
    for ops in (float_ops, int8_ops):
        assert sum(figures["share"] for figures in ops.values()) == pytest.approx(1.0)
    assert "Conv" in float_ops and not any(op.startswith("QLinear") for op in float_ops)
    assert "QLinearConv" in int8_ops
