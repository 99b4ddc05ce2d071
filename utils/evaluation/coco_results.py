"""COCO results files: reading one a user gives us (checked entry by entry), image ids for image files.

A COCO results file is the JSON list that pycocotools' ``COCO.loadRes`` and the COCO
evaluation server take::

    [{"image_id": 42, "category_id": 18, "bbox": [x, y, width, height], "score": 0.91}, ...]

``bbox`` in the image's pixels, ``category_id`` the dataset's own ids. Model outputs become
entries in ``utils.evaluation.coco_eval.predictions_to_coco_results``; :class:`CocoResultsWriter` collects
them for image files (inference.py --coco-results).
"""
import json
import math
import os
from pathlib import Path

from utils.evaluation.coco_eval import predictions_to_coco_results
from utils.runtime.atomic_io import write_json_atomic
from utils.runtime.errors import UserError

RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


class ResultsFileError(UserError, ValueError):
    """A results file that is missing, not JSON, or not a COCO results list; the message names the entry."""


def read_results_file(path, image_ids=None, category_ids=None, ground_truth: str = "the ground truth") -> list:
    """The results list in ``path``, each entry checked; ids also against the ground truth if given.

    Args:
        image_ids, category_ids: the ground truth's ids (any iterables), or None not to check.
        ground_truth: how messages name the ground truth (its file).

    Raises:
        ResultsFileError: naming ``path`` and the first bad entry (``result #k``, from 0).
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsFileError(f"results file {path} not found")
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"{path}: not a valid JSON file ({exc})") from None
    if not isinstance(results, list):
        raise ResultsFileError(f"{path} holds a JSON {type(results).__name__}; expected a COCO results list "
                               f'[{{"image_id", "category_id", "bbox": [x, y, w, h], "score"}}, ...]')
    image_ids = None if image_ids is None else set(image_ids)
    category_ids = None if category_ids is None else set(category_ids)
    for index, result in enumerate(results):
        problem = _entry_problem(result)
        if problem is None and image_ids is not None and result["image_id"] not in image_ids:
            problem = f"has image_id {result['image_id']}, which is not in {ground_truth} (wrong split?)"
        if problem is None and category_ids is not None and result["category_id"] not in category_ids:
            problem = (f"has category_id {result['category_id']}, which is not among {ground_truth}'s "
                       f"categories {sorted(category_ids)[:20]}")
        if problem is not None:
            raise ResultsFileError(f"{path}: result #{index} {problem}")
    return results


def _entry_problem(result) -> str:
    """What is wrong with one results entry, or None."""
    if not isinstance(result, dict):
        return f"is not a JSON object: {result!r:.80}"
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        return f"lacks {', '.join(missing)}: {json.dumps(result)[:120]}"
    for key in ("image_id", "category_id"):
        if not isinstance(result[key], int) or isinstance(result[key], bool):
            return f"has {key}={result[key]!r:.40}; COCO ids are integers"
    bbox = result["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
        return f"has bbox {bbox!r:.80}; expected [x, y, width, height] (4 finite numbers)"
    if bbox[2] < 0 or bbox[3] < 0:
        return f"has bbox {bbox} with a negative width or height"
    if not _is_finite_number(result["score"]):
        return f"has score {result['score']!r:.40}; expected a finite number"
    return None


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def image_ids_for_files(paths: list, image_list: dict = None, source: str = "--image-info") -> list:
    """The COCO image id of each image file, in order.

    Args:
        paths: image file paths.
        image_list: ``{file_name: image id}`` of an image-info or annotation file
            (``utils.data.coco_annotations.read_image_list``); a path matches an entry whose ``file_name`` is
            the path itself, or the path's last components (``val2017/x.jpg`` or ``x.jpg``).
            None: ids 1, 2, ... in the order of ``paths``.

    Raises:
        UserError: a file that ``image_list`` does not list, named with ``source``.
    """
    if image_list is None:
        return list(range(1, len(paths) + 1))
    ids = []
    for path in paths:
        parts = Path(path).parts
        candidates = [str(path)] + [os.path.join(*parts[-depth:]) for depth in range(min(len(parts), 3), 0, -1)]
        image_id = next((image_list[name] for name in candidates if name in image_list), None)
        if image_id is None:
            raise UserError(f"{path} is not listed in {source} (no image entry with file_name "
                            f"{Path(path).name!r}); give the image-info file of the images you run on")
        ids.append(image_id)
    return ids


class CocoResultsWriter:
    """Collects the COCO results of image files run one by one, and writes them (inference.py --coco-results).

    Args:
        path: the results file to write.
        paths: the image files, in the order their indices are given to :meth:`add`.
        image_list, source: see :func:`image_ids_for_files` (checked here, before any model runs).
    """

    def __init__(self, path, paths: list, image_list: dict = None, source: str = "--image-info"):
        self.path = Path(path)
        self.image_ids = image_ids_for_files(paths, image_list, source)
        self.results, self.num_images = [], 0

    def add(self, index: int, output: dict, categories: list) -> None:
        """Image ``paths[index]``'s detections: ``boxes`` ``[D, 4]`` x1y1x2y2 in its pixels, ``scores``,
        ``labels`` indexing ``categories`` (``[{"id", "name"}]``, the model's dataset ids)."""
        self.results += predictions_to_coco_results([output], [self.image_ids[index]], [c["id"] for c in categories])
        self.num_images += 1

    def write(self) -> Path:
        write_json_atomic(self.path, self.results)
        return self.path
