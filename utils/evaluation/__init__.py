"""COCO evaluation: scoring detections with pycocotools (``coco_eval``), reading and writing
results files (``coco_results``), precision/recall curves (``pr_plot``)."""
