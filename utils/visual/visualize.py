"""Draw detections onto images so that they read at any resolution.

``draw_detections`` wraps ``torchvision.utils.draw_bounding_boxes`` with the three
choices it leaves to the caller:

- colour: one per class, fixed for the class across images and runs;
- line width and font size: scaled with the image, so a 64 px thumbnail and a
  4000 px photo both show boxes and labels at about the same size on screen;
- font: ``draw_bounding_boxes`` honours ``font_size`` only with a TrueType file,
  so one is looked up once (DejaVu Sans and friends); without one, the labels use
  PIL's small built-in bitmap font rather than failing.
"""
import colorsys
import functools
import glob
import inspect
import math
import os

import torch
from PIL import Image, ImageFont, features
from torchvision.utils import draw_bounding_boxes

# Common sans-serif fonts by file name; PIL's truetype() also searches the system font folders for a bare name.
_FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "LiberationSans-Regular.ttf", "Arial.ttf",
               "arial.ttf", "FreeSans.ttf", "NotoSans-Regular.ttf", "Roboto-Regular.ttf")
_FONT_GLOBS = ("/usr/share/fonts/**/*.ttf", "/usr/local/share/fonts/**/*.ttf", "/Library/Fonts/*.ttf",
               "C:/Windows/Fonts/*.ttf")
# fill_labels (text on a solid box, readable on any background) arrived in torchvision 0.21.
_HAS_FILL_LABELS = "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


def class_color(label: int) -> tuple:
    """A saturated RGB colour for class ``label``, distinct from its neighbours' and stable across runs.

    Hues step by the golden ratio, so any run of consecutive labels is spread over the
    whole colour wheel instead of crowding one part of it.
    """
    hue = (int(label) * 0.6180339887) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def text_color(background) -> tuple:
    """Black or white, whichever reads better on ``background`` (Rec. 601 luma)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def drawing_sizes(height: int, width: int, box_side: float = None) -> tuple:
    """``(line_width, font_size)`` in pixels for an image of this size.

    Both grow with ``sqrt(H * W)`` (the image's typical side), so they keep the same
    proportion of the picture: 64 px -> (1, 8), 640 px -> (2, 16), 3000 px -> (9, 75).
    The typical side, rather than the longer one, keeps labels on a 4000 x 100 strip small.
    ``box_side`` (the boxes' typical side in px, e.g. the median ``sqrt(area)``) caps both
    for small objects in a large image: a 75 px label over a 20 px box hides its neighbours,
    so labels stay about a box high (at least 10 px, to be readable) and lines a tenth of it.
    """
    side = math.sqrt(max(height, 1) * max(width, 1))
    line_width = max(1, round(side / 320))
    font_size = min(max(8, round(side / 40)), max(8, min(height, width) // 2))
    if box_side is not None:
        line_width = min(line_width, max(1, round(box_side / 10)))
        font_size = min(font_size, max(10, round(box_side)))
    return line_width, font_size


@functools.lru_cache(maxsize=1)
def find_font():
    """Path of a usable TrueType font, or None when the system has none (or PIL lacks FreeType)."""
    if not features.check("freetype2"):
        return None
    for candidate in _font_candidates():
        try:
            font = ImageFont.truetype(candidate, size=10)
        except OSError:
            continue
        # draw_bounding_boxes reopens the font itself, so hand it the resolved file.
        return font.path if isinstance(font.path, str) else candidate
    return None


def _font_candidates():
    yield from _FONT_NAMES
    try:  # matplotlib ships DejaVu Sans, when it is installed
        from matplotlib import font_manager
        yield font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # noqa: BLE001 - matplotlib is optional and its font cache may be broken
        pass
    for pattern in _FONT_GLOBS:  # any TrueType font at all beats the bitmap fallback
        yield from sorted(glob.glob(pattern, recursive=True))[:3]


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    class_names) -> torch.Tensor:
    """Image with each box outlined in its class colour and labelled ``"<name> <score>"``.

    Args:
        image: ``ByteTensor[3, H, W]`` RGB.
        boxes: ``FloatTensor[N, 4]`` absolute ``x1, y1, x2, y2`` in this image's pixels.
        labels: ``Int64Tensor[N]`` in ``[0, len(class_names))``; scores: ``FloatTensor[N]``, or None
            for ground truth (labelled ``"<name>"`` only).
        class_names: label k -> display name.

    Returns:
        a new ``ByteTensor[3, H, W]``; the input is left untouched.
    """
    if boxes.numel() == 0:
        return image.clone()
    height, width = image.shape[-2:]
    box_side = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1).sqrt().median()
    line_width, font_size = drawing_sizes(height, width, float(box_side))
    if scores is None:
        texts = [str(class_names[int(label)]) for label in labels]
    else:
        texts = [f"{class_names[int(label)]} {float(score):.2f}" for label, score in zip(labels, scores)]
    colors = [class_color(int(label)) for label in labels]
    font_args = {}
    font = find_font()
    if font is not None:
        font_args = {"font": font, "font_size": font_size}
    if _HAS_FILL_LABELS:
        font_args.update(fill_labels=True, label_colors=[text_color(color) for color in colors])
    return draw_bounding_boxes(image, boxes.float().cpu(), texts, colors=colors, width=line_width, **font_args)


def save_image(image: torch.Tensor, path, quality: int = 90) -> None:
    """Save ``ByteTensor[3, H, W]`` RGB; the format follows the extension (.jpg, .png, ...)."""
    array = image.permute(1, 2, 0).contiguous().cpu().numpy()
    extension = os.path.splitext(os.fspath(path))[1].lower()
    options = {"quality": quality} if extension in (".jpg", ".jpeg", ".webp") else {}
    Image.fromarray(array).save(path, **options)
