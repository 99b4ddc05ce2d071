"""Read any common image file as an upright ``uint8`` RGB tensor ``[3, H, W]``.

Shared by the dataset and by inference so that training and deployment see the
same pixels for the same file.

Decode path: JPEG and PNG (recognised by their magic bytes, not the file
extension, since scraped datasets often mislabel them) go through
``torchvision.io`` (libjpeg-turbo / libpng; about 2x faster than PIL on a
640x480 JPEG or PNG here), which also converts CMYK and grayscale JPEGs, expands
palettes, handles 16-bit PNGs and applies the EXIF orientation. Everything else
(BMP, WebP, GIF, TIFF, ...), PNGs with colour-key transparency (which
torchvision ignores) and any JPEG/PNG torchvision refuses (12-bit or
arithmetic-coded JPEG, ...) goes through PIL with ``ImageOps.exif_transpose``.
Both paths are checked against a PIL reference in ``tests/data/test_image_io.py``.

Alpha: composited onto white rather than dropped. Transparent pixels usually
store arbitrary colour (often black) under alpha 0, so dropping alpha turns a
black logo on a transparent background into an all-black image; white is what
browsers and most annotation tools show behind a transparent image, i.e. what
the annotator saw.

16-bit images are scaled with rounding, ``round(v * 255 / 65535)``, so the full
0..65535 range maps onto 0..255 (PIL's own 16-bit -> 8-bit conversion clips
instead, turning most of the range white).
"""
import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

try:  # torchvision's decoders are deprecated since 0.29; PIL covers us once they go.
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_jpeg = decode_png = ImageReadMode = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PIL_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_PIL_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageReadError(OSError):
    """An image file is missing, unreadable, not an image, or truncated/corrupt.

    Constructed from a single message so that it survives being re-raised from a
    DataLoader worker with its type intact (the worker re-creates it as
    ``type(msg)``). ``path`` holds the offending file when known.
    """

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = path


def is_image_file(path) -> bool:
    """True when ``path`` ends with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def read_image(path) -> torch.Tensor:
    """Decode ``path`` into an upright RGB image.

    Returns:
        ``ByteTensor[3, H, W]`` (uint8, RGB), with the EXIF orientation applied,
        so ``H, W`` are those of the image as displayed.

    Raises:
        ImageReadError: the file is missing, unreadable, empty, not an image, or
            truncated/corrupt; the message names the path and the reason.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image '{path}': file not found", path) from None
    except OSError as e:
        raise ImageReadError(f"cannot read image '{path}': {e.strerror or e}", path) from None
    if not data:
        raise ImageReadError(f"cannot read image '{path}': file is empty", path)

    if decode_jpeg is not None and (data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC)):
        try:
            image = _decode_with_torchvision(data)
        except RuntimeError:
            # PIL either decodes what libjpeg/libpng refused or gives a clearer
            # reason than torchvision's C++ source location.
            image = None
        if image is not None:
            return image
    try:
        return _decode_with_pil(data)
    except ImageReadError as e:
        raise ImageReadError(f"cannot read image '{path}': {e}", path) from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"cannot read image '{path}': {e}", path) from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"cannot read image '{path}': not an image file "
                             f"(unrecognised format)", path) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise ImageReadError(f"cannot read image '{path}': corrupt or truncated image "
                             f"({type(e).__name__}: {e})", path) from None


def _decode_with_torchvision(data: bytes):
    """Fast path for JPEG/PNG; None for the cases it is known to get wrong."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if data.startswith(_JPEG_MAGIC):
        # mode=RGB converts grayscale and (Adobe) CMYK JPEGs; JPEG has no alpha.
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    color_type, has_trns = _png_color_type(data)
    # Checked against PIL for every PNG colour type: UNCHANGED returns raw palette
    # indices, RGB_ALPHA garbles opaque palette/gray images, and colour-key
    # transparency (tRNS on gray/RGB) is not applied by either mode -> PIL.
    if color_type is None or (has_trns and color_type in (0, 2)):
        return None
    has_alpha = color_type in (4, 6) or has_trns
    mode = ImageReadMode.RGB_ALPHA if has_alpha else ImageReadMode.RGB
    image = decode_png(encoded, mode=mode, apply_exif_orientation=True)
    max_value = 65535 if image.dtype == torch.uint16 else 255
    return to_rgb_uint8(image, max_value)


def _png_color_type(data: bytes):
    """(IHDR colour type, whether a tRNS chunk precedes the pixel data) of a PNG."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None, False  # malformed: PIL reports it properly
    color_type = data[25]
    offset = 33  # signature (8) + IHDR chunk (4 length + 4 type + 13 data + 4 crc)
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset:offset + 4], "big")
        chunk_type = data[offset + 4:offset + 8]
        if chunk_type == b"tRNS":
            return color_type, True
        if chunk_type in (b"IDAT", b"IEND"):
            break
        offset += 12 + length
    return color_type, False


def _decode_with_pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode now so truncation surfaces here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode == "F":
            raise ImageReadError("32-bit float images are not supported")
        if img.mode in _PIL_16BIT_MODES:
            # Mode "I" is how Pillow hands over 16-bit grayscale (PNG, PNM, TIFF);
            # values outside 0..65535 cannot be interpreted and are clipped.
            array = np.clip(np.asarray(img, dtype=np.int64), 0, 65535).astype(np.int32)
            return to_rgb_uint8(torch.from_numpy(array)[None], 65535)
        has_alpha = img.mode in _PIL_ALPHA_MODES or "transparency" in img.info
        array = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))  # [H, W, C]
    return to_rgb_uint8(torch.from_numpy(array.copy()).permute(2, 0, 1), 255)


def to_rgb_uint8(image: torch.Tensor, max_value: int = 255) -> torch.Tensor:
    """Flatten gray / gray+alpha / RGB / RGBA ``[C, H, W]`` into ``uint8 [3, H, W]``.

    Args:
        image: integer tensor ``[C, H, W]`` with C in {1, 2, 3, 4}; values in
            ``[0, max_value]``. The last channel is alpha when C is 2 or 4.
        max_value: 255 for 8-bit data, 65535 for 16-bit data.

    Alpha is composited onto white: ``out = c * a + max * (1 - a)`` (see the module
    docstring for why), then everything is scaled to 0..255 with rounding.
    """
    if image.ndim != 3 or image.shape[0] not in (1, 2, 3, 4):
        raise ValueError(f"expected an image [C, H, W] with C in 1..4, got shape {tuple(image.shape)}")
    num_channels = image.shape[0]
    has_alpha = num_channels in (2, 4)
    color = image[:-1] if has_alpha else image
    if has_alpha and bool((image[-1] == max_value).all()):
        has_alpha = False  # fully opaque (e.g. the filler libpng adds): skip the arithmetic
    if not has_alpha and max_value == 255:
        rgb = color.to(torch.uint8)
    else:
        # int32 holds 255 * 255 * 255 for 8-bit; 16-bit products need int64.
        work_dtype = torch.int32 if max_value == 255 else torch.int64
        color = color.to(work_dtype)
        if has_alpha:
            alpha = image[-1:].to(work_dtype)
            scale = max_value * max_value
            color = color * alpha + max_value * (max_value - alpha)  # in [0, max^2]
        else:
            scale = max_value
        rgb = ((color * 255 + scale // 2) // scale).to(torch.uint8)  # round(v * 255 / scale)
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1)
    return rgb.contiguous()
