"""What the format readers share: records, problem reporting, image sizes, class lists, COCO output.

Boxes are absolute ``x1, y1, x2, y2`` pixels of the image as displayed (EXIF orientation
applied, as ``utils.data.image_io.read_image`` decodes it), the convention of the rest of the
repository; COCO's ``[x, y, w, h]`` appears only in :func:`to_coco`.
"""
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from utils.data.image_io import is_image_file
from utils.runtime.errors import UserError

logger = logging.getLogger(__name__)

# EXIF orientations 5-8 rotate by 90 degrees: the displayed image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_WARNINGS_SHOWN_PER_KIND = 5


class ConversionError(UserError, ValueError):
    """An input file that cannot be converted; the message names the file (and line)."""


@dataclass
class ObjectEntry:
    """One box: ``box`` (x1, y1, x2, y2) in pixels, its class name, and whether it is an ignored
    (COCO ``iscrowd``) region; ``where`` is ``file:line`` for messages."""
    box: tuple
    class_name: str
    ignore: bool = False
    where: str = ""


@dataclass
class ImageEntry:
    """One image: the source ``path``, its ``width`` x ``height`` as displayed, and its objects
    (none = a negative image, kept: it teaches the detector what is background)."""
    path: Path
    width: int
    height: int
    objects: list = field(default_factory=list)
    where: str = ""


class Problems:
    """Collects what is skipped (an unknown class, a degenerate box, a missing image) with where it
    was found. The first few of each kind are logged, all are counted for the summary;
    ``strict`` turns each into a :class:`ConversionError` instead."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts = Counter()
        self.notes = Counter()

    def skip(self, kind: str, where: str, message: str) -> None:
        if self.strict:
            raise ConversionError(f"{where}: {message} (--strict)")
        self.counts[kind] += 1
        if self.counts[kind] <= _WARNINGS_SHOWN_PER_KIND:
            logger.warning("%s: %s; skipped", where, message)
        elif self.counts[kind] == _WARNINGS_SHOWN_PER_KIND + 1:
            logger.warning("more '%s' problems follow; only counted from here on", kind)

    def note(self, kind: str) -> None:
        """Something fixed on the way (a box clipped to its image): counted, not a problem."""
        self.notes[kind] += 1

    def summary(self) -> str:
        parts = [f"{count} skipped: {kind}" for kind, count in sorted(self.counts.items())]
        parts += [f"{count} {kind}" for kind, count in sorted(self.notes.items())]
        return "; ".join(parts) if parts else "no problems"


def image_size(path: Path) -> tuple:
    """``(width, height)`` of ``path`` as displayed (EXIF rotation applied), from the header alone."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise OSError(f"cannot read image {path}: {exc}") from None
    return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)


def find_images(folder: Path) -> list:
    """Image files under ``folder`` (any depth), sorted."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and is_image_file(path))


def read_class_list(spec, where: str = "--classes") -> list:
    """``--classes`` values: names, or one file of names (one per line, or yhenon's CSV ``name,id``)."""
    if spec is None:
        return None
    if len(spec) == 1 and Path(spec[0]).is_file():
        path = Path(spec[0])
        names, ids = [], []
        for line_number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[1].lstrip("-").isdigit():
                names.append(fields[0])
                ids.append(int(fields[1]))
            elif len(fields) == 1:
                names.append(fields[0])
            else:
                raise ConversionError(f"{path}:{line_number}: expected a class name or 'name,id', got {line!r}")
        if ids and len(ids) == len(names):  # name,id rows: the ids give the order
            names = [name for _, name in sorted(zip(ids, names))]
        spec = names
    check_class_names(spec, where)
    return list(spec)


def check_class_names(names, where: str) -> None:
    if not names:
        raise ConversionError(f"{where}: no class names")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ConversionError(f"{where}: class name {repeated[0]!r} appears more than once")


def clip_box(box, width: int, height: int, problems: Problems):
    """``box`` clipped to the image, or None when nothing of positive area is left."""
    x1, y1, x2, y2 = box
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
               min(max(y2, 0.0), height))
    if clipped != tuple(box):
        problems.note("boxes clipped to their image")
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return None
    return clipped


def parse_number(text, where: str, what: str) -> float:
    """A finite float from ``text``, or a ConversionError naming ``where`` and ``what``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConversionError(f"{where}: {what} is {text!r}; coordinates must be finite")
    return value


def add_object(entry: ImageEntry, box, class_name: str, classes, problems: Problems, where: str,
               ignore: bool = False, shown: str = None) -> None:
    """Append a box to ``entry`` after the checks every format shares: a known class (when the class
    list is fixed), positive width and height, clipped to the image. ``shown``: the box as the
    file writes it, for messages (default: ``x1, y1, x2, y2``)."""
    if classes is not None and class_name not in classes:
        problems.skip("unknown class", where, f"class {class_name!r} is not in the class list")
        return
    x1, y1, x2, y2 = box
    shown = shown or f"box {[round(v, 2) for v in box]} (x1, y1, x2, y2)"
    if x2 <= x1 or y2 <= y1:
        problems.skip("degenerate box", where, f"{shown} has no area")
        return
    clipped = clip_box(box, entry.width, entry.height, problems)
    if clipped is None:
        problems.skip("box outside its image", where, f"{shown} lies outside the {entry.width}x{entry.height} image")
        return
    entry.objects.append(ObjectEntry(clipped, class_name, ignore, where))


def to_coco(entries: list, file_names: list, class_names: list) -> dict:
    """The COCO detection dict: image ids 1..N in ``entries`` order, category ids 1..K in
    ``class_names`` order, ignored objects as ``iscrowd`` 1."""
    category_id = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, (entry, file_name) in enumerate(zip(entries, file_names), 1):
        images.append({"id": image_id, "file_name": file_name, "width": entry.width, "height": entry.height})
        for obj in entry.objects:
            x1, y1, x2, y2 = obj.box
            w, h = round(x2 - x1, 3), round(y2 - y1, 3)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id[obj.class_name],
                                "bbox": [round(x1, 3), round(y1, 3), w, h], "area": round(w * h, 3),
                                "iscrowd": int(obj.ignore)})
    categories = [{"id": category_id[name], "name": name, "supercategory": ""} for name in class_names]
    return {"images": images, "annotations": annotations, "categories": categories}
