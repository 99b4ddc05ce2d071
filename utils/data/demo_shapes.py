"""Drawing the demo data: one image of coloured shapes on a cluttered background, and its boxes.

Only pixels and boxes here, from a ``numpy.random.Generator`` the caller seeds; which images a
dataset holds, their files and annotations are `utils/data/demo_data.py`'s. The category is
decided by shape alone (colours are random per object) and clutter is thinner than any object,
so a small detector has something to learn that is not trivial. A change to what is drawn bumps
`demo_data.GENERATOR_VERSION`, so copies on disk are regenerated.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

# Non-contiguous ids on purpose: the training code must map ids to labels
# instead of assuming 1..K, as it must for real COCO.
DEMO_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "cross", "supercategory": "shape"},
]
MIN_OBJECT_SIZE = 12  # px, larger side of the tight box
MAX_OBJECTS = 6
MIN_COLOUR_DISTANCE = 80.0  # RGB euclidean distance to the local background mean
MIN_VISIBLE_FRACTION = 0.5  # an earlier object keeps at least this much of its pixels


def _unit_outline(name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices [V, 2] of a randomly varied shape around the origin, before scaling."""
    if name == "circle":
        t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
        points = np.stack([np.cos(t), np.sin(t) * rng.uniform(0.85, 1.15)], axis=1)
        angle = 0.0
    elif name == "rectangle":
        aspect = rng.uniform(0.6, 1.6)
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * [aspect, 1.0]
        angle = rng.uniform(-20, 20)  # mild tilt; stronger tilts start to look like diamonds
    elif name == "triangle":
        t = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.25, 0.25, 3)
        points = np.stack([np.cos(t), np.sin(t)], axis=1)
        angle = rng.uniform(0, 360)
    elif name == "cross":
        a, b = rng.uniform(0.25, 0.4), 1.0  # half-thickness and half-length of each bar
        points = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                           [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
        angle = rng.uniform(0, 90)  # 90-fold symmetric, so this covers '+' through 'x'
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of "
                         f"{[c['name'] for c in DEMO_CATEGORIES]}")
    theta = math.radians(angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return points @ rotation.T


def shape_mask(name: str, extent: int, rng: np.random.Generator) -> np.ndarray:
    """Rasterise one shape and return its mask `bool[h, w]`, cropped tight.

    `extent` is the target larger side in pixels. The mask is cropped to the
    pixels actually drawn, so its shape *is* the object's tight box: no
    rounding of analytic vertices can leave a box a pixel too big or small.
    """
    points = _unit_outline(name, rng)
    points = points - points.min(axis=0)
    points = points * ((extent - 1) / points.max()) + 1.0  # 1 px margin against clipping
    canvas = Image.new("L", (extent + 3, extent + 3), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    mask = np.asarray(canvas) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _background(rng: np.random.Generator, height: int, width: int, clutter_scale: float = 1.0) -> Image.Image:
    """Smooth colour gradient + low-frequency blotches + thin clutter that is not an object.

    ``clutter_scale`` s: the image's side over the demo's 160 px. Lines cross the whole image, so
    there are s times as many; arcs keep the demo's radii and dots their size, s^2 times as many,
    so every 160 px window of a large image is as cluttered as a demo image. 1 is the demo exactly.
    """
    theta = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(width, dtype=np.float32)[None, :] * math.cos(theta)
            + np.arange(height, dtype=np.float32)[:, None] * math.sin(theta))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, end = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    gradient = start + ramp[..., None] * (end - start)
    # Upsampling a tiny random grid gives smooth texture at vectorised cost.
    blotches = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    blotches = np.asarray(blotches.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(0.65 * gradient + 0.35 * blotches, 0, 255).astype(np.uint8)

    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    size = np.array([width, height], dtype=float)
    # Lines, arcs and dots share colours and edges with the objects, so the
    # detector has to learn shape rather than "anything with an edge".
    for _ in range(_scaled_count(rng.integers(2, 7), clutter_scale)):
        x0, y0, x1, y1 = rng.uniform(-0.2, 1.2, 4) * np.tile(size, 2)
        draw.line([(x0, y0), (x1, y1)], fill=_random_colour(rng), width=int(rng.integers(1, 3)))
    for _ in range(_scaled_count(rng.integers(0, 4), clutter_scale ** 2)):
        cx, cy = rng.uniform(0, 1, 2) * size
        radius = rng.uniform(0.1, 0.4) * size.min() / clutter_scale
        start_angle = rng.uniform(0, 360)
        draw.arc([cx - radius, cy - radius, cx + radius, cy + radius], start_angle,
                 start_angle + rng.uniform(40, 200), fill=_random_colour(rng), width=int(rng.integers(1, 3)))
    for _ in range(_scaled_count(rng.integers(2, 10), clutter_scale ** 2)):
        cx, cy = rng.uniform(0, 1, 2) * size
        rx, ry = rng.uniform(1, 3.5, 2)  # at most ~7 px: clearly below MIN_OBJECT_SIZE
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=_random_colour(rng))
    return image


def _scaled_count(count, factor: float) -> int:
    # int(count) unchanged at factor 1, so the default data keeps its exact random stream.
    return int(count) if factor == 1 else int(round(float(count) * factor))


def _random_colour(rng: np.random.Generator) -> tuple:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _contrasting_colour(rng: np.random.Generator, local_mean: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_COLOUR_DISTANCE from `local_mean`, else the farthest tried."""
    candidates = rng.uniform(0, 255, (16, 3))
    distance = np.linalg.norm(candidates - local_mean, axis=1)
    good = np.flatnonzero(distance >= MIN_COLOUR_DISTANCE)
    return candidates[good[0]] if len(good) else candidates[distance.argmax()]


def render_image(rng: np.random.Generator, height: int, width: int,
                 empty_fraction: float = 0.05, *, num_objects=(1, MAX_OBJECTS), object_size=None,
                 clutter_scale: float = 1.0):
    """Draw one image and its objects.

    `num_objects` (min, max) objects in a non-empty image; `object_size`
    (min, max) larger side of an object's box in px, None for the demo's
    MIN_OBJECT_SIZE to 85 % of the shorter side; `clutter_scale` see
    `_background`. The defaults draw the demo's images exactly.

    Returns `(pixels uint8[H, W, 3], label_map int32[H, W], objects)` where
    `label_map` is 0 for background and k + 1 where object k is visible, and
    `objects` is a list of dicts with `category_id`, `bbox` (COCO x, y, w, h of
    the visible pixels) and `area` (visible pixel count).
    """
    count = 0 if rng.random() < empty_fraction else int(rng.integers(num_objects[0], num_objects[1] + 1))
    min_extent, max_extent = object_size or (MIN_OBJECT_SIZE, max(MIN_OBJECT_SIZE, int(0.85 * min(height, width))))
    # Log-uniform sizes favour small and medium objects, as in natural images.
    extents = np.exp(rng.uniform(math.log(min_extent), math.log(max_extent + 1), count))
    categories = rng.integers(0, len(DEMO_CATEGORIES), count)

    canvas = np.asarray(_background(rng, height, width, clutter_scale), dtype=np.float32).copy()
    label_map = np.zeros((height, width), dtype=np.int32)
    placed, pixel_counts, visible_counts, windows = [], [], [], []
    # Largest first: later, smaller objects may overlap but never bury a big one.
    for order in np.argsort(-extents, kind="stable"):
        mask = shape_mask(DEMO_CATEGORIES[categories[order]]["name"], int(extents[order]), rng)
        mask_h, mask_w = mask.shape
        for _attempt in range(20):
            y = int(rng.integers(0, height - mask_h + 1))
            x = int(rng.integers(0, width - mask_w + 1))
            covered = label_map[y:y + mask_h, x:x + mask_w][mask]
            lost = np.bincount(covered, minlength=len(placed) + 1)[1:]
            if all(visible_counts[k] - lost[k] >= MIN_VISIBLE_FRACTION * pixel_counts[k]
                   for k in range(len(placed))):
                break
        else:
            continue  # no acceptable spot: drop the object rather than hide another
        region = canvas[y:y + mask_h, x:x + mask_w]
        colour = _contrasting_colour(rng, region.reshape(-1, 3).mean(axis=0))
        # A gentle brightness ramp so objects are not flat colour stamps.
        ramp = np.linspace(-1.0, 1.0, mask_w)[None, :] * rng.uniform(-0.2, 0.2)
        shaded = colour[None, None, :] * (1.0 + ramp[..., None])
        region[mask] = np.broadcast_to(shaded, (mask_h, mask_w, 3))[mask]
        label_map[y:y + mask_h, x:x + mask_w][mask] = len(placed) + 1
        for k in range(len(placed)):
            visible_counts[k] -= int(lost[k])
        placed.append(int(categories[order]))
        pixel_counts.append(int(mask.sum()))
        visible_counts.append(pixel_counts[-1])
        windows.append((y, x, mask_h, mask_w))

    canvas += 6.0 * rng.standard_normal(canvas.shape, dtype=np.float32)  # sensor-like noise
    pixels = np.clip(canvas, 0, 255).round().astype(np.uint8)
    objects = []
    for k, category_index in enumerate(placed):
        # Boxes come from what is visible, as in COCO. An object's pixels lie inside the window it
        # was placed in: searching only there keeps a large image with many objects fast.
        y, x, mask_h, mask_w = windows[k]
        rows, cols = np.nonzero(label_map[y:y + mask_h, x:x + mask_w] == k + 1)
        rows, cols = rows + y, cols + x
        x0, y0, x1, y1 = (float(v) for v in (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
        objects.append({"category_id": DEMO_CATEGORIES[category_index]["id"],
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(len(rows))})
    return pixels, label_map, objects
