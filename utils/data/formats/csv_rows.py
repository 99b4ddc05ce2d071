"""CSV: one ``path,x1,y1,x2,y2,class`` row per box (the format of yhenon/pytorch-retinanet).

Paths are relative to the CSV file's folder (or absolute); coordinates are absolute
pixels of the image. All rows of an image are gathered, in the order the images first
appear. A row whose box and class fields are all empty (``img.jpg,,,,,``) marks an
image without objects, kept as a negative. A first row whose coordinate fields are
words (``path,x1,y1,x2,y2,class``) is taken as a header. Class names: ``--classes``
(names, or a ``name,id`` file as yhenon's ``classes.csv``), else every name found, sorted.
"""
import csv
from pathlib import Path

from tqdm import tqdm

from utils.data.formats.common import ConversionError, ImageEntry, Problems, add_object, image_size, parse_number


def _is_header(row: list) -> bool:
    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False
    return len(row) == 6 and all(field.strip() and not is_number(field) for field in row[1:5])


def read_rows(csv_path: Path) -> list:
    """``[(line number, [6 stripped fields])]`` of the data rows; ConversionError naming the line otherwise."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = []
            for row in reader:
                if not row or not any(field.strip() for field in row):
                    continue
                if len(row) != 6:
                    raise ConversionError(f"{csv_path}:{reader.line_num}: expected 6 fields "
                                          f"path,x1,y1,x2,y2,class, got {len(row)}: {','.join(row)!r:.120}")
                rows.append((reader.line_num, [field.strip() for field in row]))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConversionError(f"cannot read {csv_path}: {exc}") from None
    if rows and rows[0][0] == 1 and _is_header(rows[0][1]):
        rows = rows[1:]
    if not rows:
        raise ConversionError(f"{csv_path}: no rows")
    return rows


def read_csv(csv_path, classes: list = None, problems: Problems = None):
    """``(entries, class names)`` of a CSV annotation file (see the module docstring)."""
    csv_path, problems = Path(csv_path), problems or Problems()
    if not csv_path.is_file():
        raise ConversionError(f"{csv_path} not found: --input of --format csv is a file of path,x1,y1,x2,y2,class rows")
    rows = read_rows(csv_path)
    entries, unreadable, found_classes = {}, set(), set()
    for line, (path_text, *coordinates, class_name) in tqdm(rows, desc="reading CSV", unit="row"):
        where = f"{csv_path}:{line}"
        if not path_text:
            raise ConversionError(f"{where}: empty image path")
        image_path = Path(path_text) if Path(path_text).is_absolute() else csv_path.parent / path_text
        if image_path in unreadable:
            continue
        entry = entries.get(image_path)
        if entry is None:
            if not image_path.is_file():
                problems.skip("image not found", where, f"image {image_path} not found")
                unreadable.add(image_path)
                continue
            try:
                width, height = image_size(image_path)
            except OSError as exc:
                problems.skip("unreadable image", where, str(exc))
                unreadable.add(image_path)
                continue
            entry = entries[image_path] = ImageEntry(image_path, width, height, where=where)
        if not any(coordinates) and not class_name:
            continue  # an image without objects
        if not all(coordinates) or not class_name:
            raise ConversionError(f"{where}: give all of x1,y1,x2,y2,class, or none of them for an image "
                                  f"without objects")
        box = tuple(parse_number(value, where, name) for value, name in zip(coordinates, ("x1", "y1", "x2", "y2")))
        if classes is None:
            found_classes.add(class_name)
        add_object(entry, box, class_name, classes, problems, where)
    return list(entries.values()), list(classes) if classes is not None else sorted(found_classes)
