"""Deployment: the detector as one ONNX graph, and running it with ONNX Runtime.

``deploy.graph``        the export-friendly forward (one uint8 image in, detections out)
``deploy.onnx_export``  torch -> ``.onnx`` with the category table in its metadata
``deploy.ort_detector`` the ``.onnx`` run by ONNX Runtime (numpy only, no torch)
``deploy.quantize``     an exported ``.onnx`` to a calibrated INT8 one (ONNX Runtime static quantization)
``deploy.verify``       ONNX Runtime against PyTorch on the same images; INT8 against float
``deploy.predict``      a detector (eager or ONNX) over image files and videos: drawn copies, JSON records;
                        ``OnnxEvalModel``, an export behind the eager call surface for ``engine.evaluate``

Imports run one way: ``model`` <- ``deploy`` <- entry scripts (export.py, inference.py, evaluation.py).
"""
