"""Pascal VOC: ``Annotations/<id>.xml`` + ``JPEGImages/<id>.jpg`` (+ ``ImageSets/Main/<set>.txt``).

Which images: the ids listed in ``ImageSets/Main/<image_set>.txt`` when that list
exists (the VOC devkit's splits), else every XML file; in both cases an image without
an XML file is kept as a negative. Boxes: VOC's ``xmin ymin xmax ymax`` are 1-based
pixel indices of the first and last pixel, so the box in continuous pixel coordinates is
``(xmin - 1, ymin - 1, xmax, ymax)`` (as detectron2 reads VOC). ``difficult`` objects
(VOC's evaluation ignores them) become ignored regions (COCO ``iscrowd``: the loss neither
rewards nor penalises anchors on them, and COCO evaluation does not count them), are
kept as ordinary boxes, or are dropped. The XML is read with its line numbers, so every
message names ``file:line``.
"""
from pathlib import Path
from xml.parsers import expat

from tqdm import tqdm

from utils.data.formats.common import (ConversionError, ImageEntry, Problems, add_object, check_class_names,
                                          image_size, parse_number)
from utils.data.image_io import IMAGE_EXTENSIONS

DIFFICULT_CHOICES = ("ignore", "keep", "drop")


class XmlNode:
    """An XML element with the line it starts on; ``text`` is its stripped character data."""
    __slots__ = ("tag", "line", "children", "parts")

    def __init__(self, tag: str, line: int):
        self.tag, self.line, self.children, self.parts = tag, line, [], []

    @property
    def text(self) -> str:
        return "".join(self.parts).strip()

    def find(self, tag: str):
        return next((child for child in self.children if child.tag == tag), None)

    def findall(self, tag: str) -> list:
        return [child for child in self.children if child.tag == tag]


def read_xml(path: Path) -> XmlNode:
    """The document's root element, or a ConversionError naming ``path:line`` for malformed XML."""
    parser = expat.ParserCreate()
    stack, roots = [], []

    def start(tag, attributes):
        node = XmlNode(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def text(data):
        if stack:
            stack[-1].parts.append(data)

    parser.StartElementHandler, parser.EndElementHandler = start, lambda tag: stack.pop()
    parser.CharacterDataHandler = text
    try:
        with open(path, "rb") as f:
            parser.ParseFile(f)
    except expat.ExpatError as exc:
        raise ConversionError(f"{path}:{exc.lineno}: not valid XML ({expat.ErrorString(exc.code)})") from None
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
    return roots[0]


def _image_ids(root: Path, image_set: str, required: bool) -> list:
    """Ids from ``ImageSets/Main/<image_set>.txt`` (first column), or None to take every XML file."""
    list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        if required:
            raise ConversionError(f"image set list {list_file} not found")
        return None
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def _find_image(image_dir: Path, image_id: str, file_name: str = None):
    if file_name and (image_dir / file_name).is_file():
        return image_dir / file_name
    for extension in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (image_dir / f"{image_id}{extension}").is_file():
            return image_dir / f"{image_id}{extension}"
    return None


def read_voc(root, image_set: str, classes: list = None, difficult: str = "ignore",
             problems: Problems = None, image_set_required: bool = False):
    """``(entries, class names)`` of a VOC root; classes are those of ``classes`` (objects of other
    classes are skipped), or every name found, sorted (VOC's own 20 classes come out in the usual order)."""
    root, problems = Path(root), problems or Problems()
    annotation_dir, image_dir = root / "Annotations", root / "JPEGImages"
    for folder in (annotation_dir, image_dir):
        if not folder.is_dir():
            raise ConversionError(f"{folder} not found: --input of --format voc is a VOC root holding "
                                  f"Annotations/ and JPEGImages/ (e.g. VOCdevkit/VOC2007)")
    ids = _image_ids(root, image_set, image_set_required)
    if ids is None:
        xml_ids = [path.stem for path in sorted(annotation_dir.glob("*.xml"))]
        labelled = set(xml_ids)
        ids = xml_ids + sorted(path.stem for path in image_dir.iterdir()
                               if path.suffix.lower() in IMAGE_EXTENSIONS and path.stem not in labelled)
    entries, found_classes = [], set()
    for image_id in tqdm(ids, desc="reading VOC", unit="img"):
        xml_path = annotation_dir / f"{image_id}.xml"
        document = read_xml(xml_path) if xml_path.is_file() else None
        name_node = document.find("filename") if document is not None else None
        file_name = name_node.text if name_node is not None else None
        image_path = _find_image(image_dir, image_id, file_name)
        where = f"{xml_path}" if document is not None else f"{root / 'ImageSets' / 'Main' / image_set}.txt"
        if image_path is None:
            problems.skip("image not found", where, f"no image for id {image_id!r} in {image_dir}")
            continue
        try:
            width, height = image_size(image_path)
        except OSError as exc:
            problems.skip("unreadable image", where, str(exc))
            continue
        entry = ImageEntry(image_path, width, height, where=where)
        entries.append(entry)
        if document is None:
            continue  # no annotation file: a negative image
        _check_stated_size(document, xml_path, width, height, problems)
        for obj in document.findall("object"):
            _add_voc_object(entry, obj, xml_path, classes, difficult, problems, found_classes)
    class_names = list(classes) if classes is not None else sorted(found_classes)
    if class_names:
        check_class_names(class_names, str(annotation_dir))
    return entries, class_names


def _check_stated_size(document: XmlNode, xml_path: Path, width: int, height: int, problems: Problems) -> None:
    size = document.find("size")
    if size is None or size.find("width") is None or size.find("height") is None:
        return
    stated = (size.find("width").text, size.find("height").text)
    if stated != (str(width), str(height)) and stated not in (("0", "0"), ("", "")):
        problems.note("images whose XML <size> differs from the file (the file's size is used)")


def _add_voc_object(entry, obj: XmlNode, xml_path: Path, classes, difficult: str, problems, found_classes):
    where = f"{xml_path}:{obj.line}"
    name_node, box_node = obj.find("name"), obj.find("bndbox")
    if name_node is None or not name_node.text:
        raise ConversionError(f"{where}: <object> has no <name>")
    if box_node is None:
        raise ConversionError(f"{where}: <object> {name_node.text!r} has no <bndbox>")
    corners = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        node = box_node.find(tag)
        if node is None:
            raise ConversionError(f"{where}: <bndbox> has no <{tag}>")
        corners.append(parse_number(node.text, f"{xml_path}:{node.line}", f"<{tag}>"))
    difficult_node = obj.find("difficult")
    is_difficult = difficult_node is not None and difficult_node.text not in ("", "0")
    if is_difficult and difficult == "drop":
        problems.note("difficult objects dropped")
        return
    if classes is None:
        found_classes.add(name_node.text)
    xmin, ymin, xmax, ymax = corners
    add_object(entry, (xmin - 1, ymin - 1, xmax, ymax), name_node.text, classes, problems, where,
               ignore=is_difficult and difficult == "ignore",
               shown=f"<bndbox> xmin {xmin:g} ymin {ymin:g} xmax {xmax:g} ymax {ymax:g}")
