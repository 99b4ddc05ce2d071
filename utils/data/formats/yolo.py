"""YOLO txt: ``images/`` and ``labels/`` side by side, one ``class cx cy w h`` line per box.

Layout (Ultralytics / darknet)::

    ROOT/images/[SPLIT/]a.jpg    ROOT/labels/[SPLIT/]a.txt    ROOT/classes.txt or ROOT/data.yaml

With a sub-folder named like the split (``images/train``), only it is read. Label lines
hold a class index and the box centre and size normalised by the image size; a line
with more values is a polygon (``class x1 y1 x2 y2 ...``, YOLO segmentation) and gives
its bounding box. An image without a label file, or with an empty one, is a negative.
Class names come from ``classes.txt`` (one per line; also looked for in ``labels/``) or
from the ``names:`` of ``data.yaml`` (a list, or a dict from index to name), read with
PyYAML when installed and by a small parser of those two forms otherwise.
"""
import re
from pathlib import Path

from tqdm import tqdm

from utils.data.formats.common import (ConversionError, ImageEntry, Problems, add_object, check_class_names,
                                          find_images, image_size, parse_number)

try:  # PyYAML is not a dependency: the names list is simple enough to read without it
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

# Normalised coordinates a little past 1 are rounding; far past it, the file holds pixels.
_MAX_NORMALISED = 1.05


def find_class_file(root: Path):
    for candidate in (root / "classes.txt", root / "labels" / "classes.txt", root / "data.yaml",
                      root / "dataset.yaml"):
        if candidate.is_file():
            return candidate
    return None


def read_class_file(path: Path) -> list:
    """Class names from ``classes.txt`` or the ``names:`` of a data.yaml, index order."""
    if path.suffix == ".txt":
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    else:
        text = path.read_text(encoding="utf-8-sig")
        names = yaml.safe_load(text).get("names") if yaml is not None else parse_yaml_names(text, path)
        if isinstance(names, dict):
            keys = sorted(names)
            if keys != list(range(len(keys))):
                raise ConversionError(f"{path}: 'names' keys must be the class indices 0..{len(keys) - 1}, "
                                      f"got {keys[:10]}")
            names = [names[k] for k in keys]
        if not isinstance(names, list):
            raise ConversionError(f"{path}: no 'names:' list or dict of class names")
        names = [str(name) for name in names]
    check_class_names(names, str(path))
    return names


def parse_yaml_names(text: str, path: Path):
    """The ``names:`` entry of a YAML file in one of the forms data.yaml files use::

        names: [cat, 'dog']        names: {0: cat, 1: dog}        names:          names:
                                                                    - cat           0: cat
                                                                    - dog           1: dog
    """
    lines = text.splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"names\s*:(.*)$", _strip_comment(line))
        if not match:
            continue
        rest = match.group(1).strip()
        if rest.startswith("[") and rest.endswith("]"):
            return [_unquote(item) for item in _split_flow(rest[1:-1])]
        if rest.startswith("{") and rest.endswith("}"):
            return dict(_key_value(item, path, number + 1) for item in _split_flow(rest[1:-1]))
        if rest:
            raise ConversionError(f"{path}:{number + 1}: cannot read 'names: {rest}' without PyYAML; "
                                  f"write it as a list [a, b] or install pyyaml")
        block = []
        for offset, item in enumerate(lines[number + 1:], number + 2):
            item = _strip_comment(item)
            if not item.strip():
                continue
            if not item[0].isspace() and not item.startswith("-"):
                break
            block.append((offset, item.strip()))
        if block and all(entry.startswith("-") for _, entry in block):
            return [_unquote(entry[1:]) for _, entry in block]
        return dict(_key_value(entry, path, offset) for offset, entry in block)
    raise ConversionError(f"{path}: no 'names:' entry")


def _strip_comment(line: str) -> str:
    """``line`` without a YAML comment (a ``#`` at the start or after a space, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _split_flow(text: str) -> list:
    """Comma-separated items of a YAML flow sequence/mapping, commas inside quotes kept."""
    return [item.strip() for item in re.findall(r"""(?:'[^']*'|"[^"]*"|[^,])+""", text) if item.strip()]


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def _key_value(item: str, path: Path, line: int):
    key, separator, value = item.partition(":")
    if not separator or not key.strip().isdigit():
        raise ConversionError(f"{path}:{line}: expected 'index: name' under 'names:', got {item!r}")
    return int(key), _unquote(value)


def read_yolo(root, split: str, classes: list = None, problems: Problems = None):
    """``(entries, class names)`` of a YOLO folder (see the module docstring)."""
    root, problems = Path(root), problems or Problems()
    image_root, label_root = root / "images", root / "labels"
    if not image_root.is_dir():
        raise ConversionError(f"{image_root} not found: --input of --format yolo holds images/ and labels/")
    if (image_root / split).is_dir():
        image_root, label_root = image_root / split, label_root / split
    if classes is None:
        class_file = find_class_file(root)
        if class_file is None:
            raise ConversionError(f"{root}: no classes.txt or data.yaml with the class names; give them with "
                                  f"--classes NAME ... (in class index order)")
        classes = read_class_file(class_file)
    images = find_images(image_root)
    if not images:
        raise ConversionError(f"no images in {image_root}")
    entries = []
    for image_path in tqdm(images, desc="reading YOLO", unit="img"):
        label_path = label_root / image_path.relative_to(image_root).with_suffix(".txt")
        try:
            width, height = image_size(image_path)
        except OSError as exc:
            problems.skip("unreadable image", str(image_path), str(exc))
            continue
        entry = ImageEntry(image_path, width, height, where=str(label_path))
        entries.append(entry)
        if label_path.is_file():
            for number, line in enumerate(label_path.read_text().splitlines(), 1):
                if line.strip():
                    _add_yolo_line(entry, line, f"{label_path}:{number}", classes, problems)
    labelled = {str(p.relative_to(image_root).with_suffix("")) for p in images}
    orphans = [p for p in label_root.rglob("*.txt") if p.name != "classes.txt"
               and str(p.relative_to(label_root).with_suffix("")) not in labelled] if label_root.is_dir() else []
    for orphan in orphans:
        problems.skip("label file without an image", str(orphan), "no image of that name in " + str(image_root))
    return entries, list(classes)


def _add_yolo_line(entry: ImageEntry, line: str, where: str, classes: list, problems: Problems) -> None:
    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        raise ConversionError(f"{where}: expected 'class cx cy w h' (or 'class x1 y1 x2 y2 ...' for a polygon), "
                              f"got {len(fields)} values: {line.strip()!r}")
    class_value = parse_number(fields[0], where, "class index")
    if class_value != int(class_value) or class_value < 0:
        raise ConversionError(f"{where}: class index {fields[0]!r} is not a non-negative integer")
    values = [parse_number(v, where, "coordinate") for v in fields[1:]]
    if any(v < -0.05 or v > _MAX_NORMALISED for v in values):
        raise ConversionError(f"{where}: coordinates {fields[1:]} are not normalised to [0, 1] "
                              f"(YOLO labels divide by the image width and height)")
    if len(values) == 4:
        cx, cy, w, h = values
        box = ((cx - w / 2) * entry.width, (cy - h / 2) * entry.height,
               (cx + w / 2) * entry.width, (cy + h / 2) * entry.height)
    else:
        xs, ys = values[0::2], values[1::2]
        box = (min(xs) * entry.width, min(ys) * entry.height, max(xs) * entry.width, max(ys) * entry.height)
    index = int(class_value)
    if index >= len(classes):
        problems.skip("unknown class", where, f"class index {index} but only {len(classes)} class names")
        return
    add_object(entry, box, classes[index], None, problems, where, shown=f"box {' '.join(fields[1:])}")
