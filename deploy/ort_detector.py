"""Run a detector exported by export.py with ONNX Runtime; numpy in and out, no torch needed.

    detector = OnnxDetector("model.onnx", device="cpu")
    result = detector(image)   # uint8 [3, H, W] RGB (numpy, or anything np.asarray takes)
    result["boxes"]            # float32 [D, 4] x1, y1, x2, y2 in the image's pixels
    result["scores"]           # float32 [D], sorted by decreasing score
    result["labels"]           # int64 [D]; detector.categories[label] = {"id", "name"}

Every problem with the file or an input is a :class:`utils.runtime.errors.UserError` naming it.
"""
import json
import os

import numpy as np
import onnxruntime

from utils.runtime.errors import UserError

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
DEVICES = ("auto", "cpu", "cuda")


class OnnxModelError(UserError):
    """An .onnx file that is missing, unreadable or not a detector exported by export.py."""


class OnnxInputError(UserError, ValueError):
    """An image the exported graph cannot take (wrong size for a --fixed-size export, wrong shape)."""


def execution_providers(device: str = "cpu") -> list:
    """``--device`` (auto, cpu, cuda, cuda:N) -> ONNX Runtime providers, CPU always last as the fallback."""
    available = onnxruntime.get_available_providers()
    device = str(device or "auto")
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise UserError(f"--device {device}: this onnxruntime has no CUDA execution provider (providers: "
                            f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu")
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise UserError(f"--device {device}: expected cuda or cuda:N")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise UserError(f"--device {device}: choose one of auto, cpu, cuda, cuda:N")


class OnnxDetector:
    """An exported RetinaNet in an ONNX Runtime session.

    Args:
        path: the ``.onnx`` written by export.py.
        device: auto, cpu, cuda or cuda:N (the execution provider).
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).

    Attributes: ``categories`` (label k -> ``{"id", "name"}``, from the file's metadata),
    ``fixed_size`` ((H, W) for a --fixed-size export, else None), ``metadata`` (all of it),
    ``providers`` (the session's, in priority order).
    """

    def __init__(self, path, device: str = "cpu", threads: int = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise OnnxModelError(f"ONNX model not found: {path}")
        providers = execution_providers(device)
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # errors only: its warnings are about optimiser internals
        try:
            self.session = onnxruntime.InferenceSession(path, options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own classes for every kind of bad file
            reason = " ".join(str(exc).split())[:300]
            raise OnnxModelError(f"{path} is not a usable ONNX model ({type(exc).__name__}: {reason})") from None
        self.path = path
        self._check_signature()
        self.metadata = self._read_metadata()
        self.categories = self.metadata.get("categories") or [
            {"id": k, "name": f"class_{k}"} for k in range(self.metadata.get("num_classes", 0))]
        size = self.metadata.get("input_size", "dynamic")
        self.fixed_size = tuple(int(s) for s in size.split()) if size != "dynamic" else None
        self.providers = self.session.get_providers()
        if providers[0] != "CPUExecutionProvider" and self.providers[0] == "CPUExecutionProvider":
            raise UserError(f"--device {device}: ONNX Runtime could not start CUDA for {path} (missing CUDA or "
                            f"cuDNN libraries?); use --device cpu")

    def _check_signature(self) -> None:
        inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [(INPUT_NAME, "tensor(uint8)")] or tuple(outputs) != OUTPUT_NAMES:
            raise OnnxModelError(f"{self.path} is not a detector exported by export.py: inputs {inputs}, outputs "
                                 f"{outputs} (expected image uint8 [3, H, W] -> {', '.join(OUTPUT_NAMES)})")

    def _read_metadata(self) -> dict:
        metadata = {}
        for key, value in self.session.get_modelmeta().custom_metadata_map.items():
            try:
                metadata[key] = json.loads(value) if key in ("categories", "model_config") else value
            except json.JSONDecodeError:
                raise OnnxModelError(f"{self.path}: metadata {key!r} is not valid JSON") from None
        if isinstance(metadata.get("model_config"), dict):
            metadata["num_classes"] = metadata["model_config"].get("num_classes", 0)
        return metadata

    @property
    def score_thresh(self) -> float:
        """The score threshold inside the graph: no detection below it comes out."""
        return float(self.metadata.get("score_thresh", 0.0))

    def __call__(self, image, name: str = "input image") -> dict:
        """``uint8 [3, H, W]`` RGB -> ``{"boxes" [D, 4], "scores" [D], "labels" [D]}`` (numpy).

        ``name`` (a file name) only appears in error messages.
        """
        image = np.ascontiguousarray(np.asarray(image))
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise OnnxInputError(f"{name}: expected a uint8 [3, H, W] RGB image, got {image.dtype} "
                                 f"{list(image.shape)}")
        if min(image.shape[1:]) < 1:
            raise OnnxInputError(f"{name} is empty: shape {list(image.shape)}")
        if self.fixed_size is not None and tuple(image.shape[1:]) != self.fixed_size:
            height, width = self.fixed_size
            raise OnnxInputError(f"{name} is {image.shape[1]} x {image.shape[2]} (H x W) but {self.path} was "
                                 f"exported for {height} x {width} images only (--fixed-size); resize it, or "
                                 f"export without --fixed-size for any size")
        boxes, scores, labels = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})
        return {"boxes": boxes, "scores": scores, "labels": labels}
