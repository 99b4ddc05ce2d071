"""read_image: every colour layout decodes to the RGB a PIL-based reference gives."""
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from utils.data import image_io
from utils.data.image_io import IMAGE_EXTENSIONS, ImageReadError, is_image_file, read_image, to_rgb_uint8

H, W = 12, 20  # non-square so a transposed result cannot pass by accident


@pytest.fixture
def rgb_array():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def smooth_rgb(height=H, width=W):
    """A gradient image: JPEG keeps it within a few levels, and it has no symmetry."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (height + width - 2)],
                    axis=-1).astype(np.uint8)


def as_hwc(image: torch.Tensor) -> np.ndarray:
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy().astype(np.int64)


def pil_rgb(path) -> np.ndarray:
    """Reference for opaque images: PIL's own decode, upright."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB")).astype(np.int64)


def composite_on_white(rgba: np.ndarray, max_value=255) -> np.ndarray:
    color, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / max_value
    return np.round((color * alpha + max_value * (1 - alpha)) * 255 / max_value).astype(np.int64)


def write_png16(path, array: np.ndarray):
    """Pillow cannot write 16-bit RGB(A) PNGs, so build one by hand (gray, RGB or RGBA)."""
    height, width, channels = array.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("name, make, save_kwargs", [
    ("rgb.png", lambda a: Image.fromarray(a), {}),
    ("gray.png", lambda a: Image.fromarray(a[..., 0]), {}),
    ("bilevel.png", lambda a: Image.fromarray(a[..., 0] > 128), {}),
    ("palette.png", lambda a: Image.fromarray(a).convert("P"), {}),
    ("palette16.png", lambda a: Image.fromarray(a).quantize(16), {}),
    ("rgb.bmp", lambda a: Image.fromarray(a), {}),
    ("rgb.webp", lambda a: Image.fromarray(a), {"lossless": True}),
    ("gray.bmp", lambda a: Image.fromarray(a[..., 0]), {}),
    ("palette.gif", lambda a: Image.fromarray(a).convert("P"), {}),
])
def test_lossless_formats_match_pil(tmp_path, rgb_array, name, make, save_kwargs):
    path = tmp_path / name
    make(rgb_array).save(path, **save_kwargs)
    image = read_image(path)
    assert image.shape == (3, H, W)
    np.testing.assert_array_equal(as_hwc(image), pil_rgb(path))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_matches_pil(tmp_path, mode):
    path = tmp_path / f"{mode}.jpg"
    Image.fromarray(smooth_rgb()).convert(mode).save(path, quality=95)
    image = read_image(path)
    assert image.shape == (3, H, W)
    # Two JPEG decoders may differ by rounding in the IDCT / colour conversion.
    assert np.abs(as_hwc(image) - pil_rgb(path)).max() <= 2
    if mode == "CMYK":  # and it is really the picture, not inverted or channel-swapped
        assert np.abs(as_hwc(image) - smooth_rgb().astype(np.int64)).mean() < 8


def test_jpeg_and_png_use_the_fast_path(tmp_path, rgb_array, monkeypatch):
    Image.fromarray(rgb_array).save(tmp_path / "a.jpg")
    Image.fromarray(rgb_array).convert("RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgb_array).convert("P").save(tmp_path / "p.png")

    def no_pil(data):
        raise AssertionError("PIL fallback used for a file torchvision handles")

    monkeypatch.setattr(image_io, "_decode_with_pil", no_pil)
    for name in ("a.jpg", "a.png", "p.png"):
        assert read_image(tmp_path / name).shape == (3, H, W)


def test_rgba_is_composited_on_white(tmp_path, rgb_array):
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, (H, W, 1), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = np.concatenate([rgb_array, alpha], axis=-1)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = as_hwc(read_image(path))
    np.testing.assert_array_equal(image, composite_on_white(rgba))
    assert image[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert image[0, 1].tolist() == rgb_array[0, 1].tolist()  # opaque -> unchanged


def _transparent_images(rgb):
    """name -> (PIL image, save kwargs); each has fully transparent pixels at [:3, :3]."""
    alpha = np.full(rgb.shape[:2], 200, dtype=np.uint8)
    alpha[:3, :3], alpha[5:, 5:] = 0, 255
    gray = rgb[..., 0].copy()
    gray[gray == 7], gray[:3, :3] = 8, 7  # 7 only where it should be transparent
    keyed = rgb.copy()
    keyed[(keyed == (1, 2, 3)).all(-1)], keyed[:3, :3] = (4, 5, 6), (1, 2, 3)
    indices = (rgb[..., 0] % 8).astype(np.uint8)
    indices[indices == 3], indices[:3, :3] = 4, 3
    palette = Image.fromarray(indices, "P")
    palette.putpalette(np.random.default_rng(2).integers(0, 256, 8 * 3).astype(np.uint8).tolist())
    return {
        "gray_alpha.png": (Image.fromarray(np.stack([gray, alpha], -1), "LA"), {}),
        "palette_trns.png": (palette, {"transparency": 3}),
        "gray_colorkey.png": (Image.fromarray(gray), {"transparency": 7}),
        "rgb_colorkey.png": (Image.fromarray(keyed), {"transparency": (1, 2, 3)}),
        "rgba.webp": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), {"lossless": True, "exact": True}),
    }


@pytest.mark.parametrize("name", ["gray_alpha.png", "palette_trns.png", "gray_colorkey.png",
                                  "rgb_colorkey.png", "rgba.webp"])
def test_transparent_formats_composite_like_pil_rgba(tmp_path, rgb_array, name):
    img, save_kwargs = _transparent_images(rgb_array)[name]
    path = tmp_path / name
    img.save(path, **save_kwargs)
    with Image.open(path) as reopened:
        reference = composite_on_white(np.asarray(reopened.convert("RGBA")))
    image = as_hwc(read_image(path))
    np.testing.assert_array_equal(image, reference)
    assert (image[:3, :3] == 255).all()  # the transparency really took effect


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    values = np.array([0, 1, 128, 129, 257, 1000, 32767, 32768, 65279, 65534, 65535], dtype=np.uint16)
    gray16 = np.resize(values, (H, W)).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    image = read_image(path)
    expected = np.round(gray16.astype(np.float64) * 255 / 65535).astype(np.int64)
    for channel in range(3):
        np.testing.assert_array_equal(image[channel].numpy(), expected)
    assert image.max() == 255 and image.min() == 0


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_layouts(tmp_path, channels):
    rng = np.random.default_rng(channels)
    array = rng.integers(0, 65536, (H, W, channels), dtype=np.uint16)
    path = tmp_path / "deep.png"
    write_png16(path, array)
    if channels == 4:
        expected = composite_on_white(array.astype(np.int64), max_value=65535)
    else:
        expected = np.round(np.broadcast_to(array, (H, W, 3)).astype(np.float64) * 255 / 65535).astype(np.int64)
    np.testing.assert_array_equal(as_hwc(read_image(path)), expected)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, suffix, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"exif{orientation}{suffix}"
    Image.fromarray(smooth_rgb()).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    image = read_image(path)
    expected_hw = (W, H) if orientation >= 5 else (H, W)  # 5..8 transpose the image
    assert tuple(image.shape[1:]) == expected_hw
    assert np.abs(as_hwc(image) - pil_rgb(path)).max() <= 2


def test_mislabelled_extension_is_decoded_by_content(tmp_path, rgb_array):
    path = tmp_path / "really_a_png.jpg"
    Image.fromarray(rgb_array).save(path, format="PNG")
    np.testing.assert_array_equal(as_hwc(read_image(path)), rgb_array)


def _truncated(path, suffix, rgb):
    Image.fromarray(rgb).save(path.with_suffix(suffix))
    data = path.with_suffix(suffix).read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, writer, reason", [
    ("missing.jpg", None, "file not found"),
    ("notes.jpg", lambda p, a: p.write_text("this is not an image"), "not an image"),
    ("empty.png", lambda p, a: p.write_bytes(b""), "empty"),
    ("half.jpg", lambda p, a: _truncated(p, ".full.jpg", a), "truncated"),
    ("half.png", lambda p, a: _truncated(p, ".full.png", a), "truncated"),
    ("half.bmp", lambda p, a: _truncated(p, ".full.bmp", a), "truncated"),
])
def test_bad_files_raise_image_read_error_naming_the_path(tmp_path, name, writer, reason):
    rgb = smooth_rgb(64, 64)
    path = tmp_path / name
    if writer is not None:
        writer(path, rgb)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, OSError)


def test_directory_raises_image_read_error(tmp_path):
    with pytest.raises(ImageReadError, match=str(tmp_path)):
        read_image(tmp_path)


def test_error_survives_worker_reraise_and_pickle():
    error = ImageReadError("cannot read image 'x.jpg': truncated", "x.jpg")
    rebuilt = type(error)(str(error))  # what a DataLoader worker does
    assert isinstance(rebuilt, ImageReadError) and str(rebuilt) == str(error)
    unpickled = pickle.loads(pickle.dumps(error))
    assert str(unpickled) == str(error) and unpickled.path == "x.jpg"


def test_image_extensions_case_insensitive():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    assert is_image_file("a/B.JPG") and is_image_file("c.WebP") and is_image_file("d.jpeg")
    assert not is_image_file("e.txt") and not is_image_file("jpg")


def test_to_rgb_uint8_rejects_bad_shapes():
    with pytest.raises(ValueError, match="C in 1..4"):
        to_rgb_uint8(torch.zeros(5, 2, 2, dtype=torch.uint8))
