"""Write the demo shapes as a Pascal VOC folder (and a clip), to try the "Your own data" steps on.

    python tools/make_voc_example.py --output data/shapes_voc --video data/shapes.mp4

gives ``Annotations/*.xml``, ``JPEGImages/*.jpg`` and ``ImageSets/Main/{train,val}.txt``
as the VOC devkit lays them out (1-based pixel boxes, ``<difficult>0</difficult>``), drawn
by ``utils/data/demo_data.py`` (coloured circles, rectangles, triangles and crosses on clutter;
a few images without objects). ``--video`` also writes the val images as an MP4 clip,
``--fps`` images per second, for ``inference.py --input clip.mp4``. ``--preset large`` writes
the large-image preset instead (24 + 8 images of 2000-3000 px with 20-60 objects of 10-40 px,
the same pixels as ``python -m utils.data.demo_data --preset large``), to try crop training and
tiled inference on (docs/your_own_data.md, "Large images").
"""
import argparse
import sys
from pathlib import Path
from xml.sax.saxutils import escape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils.data.demo_data import DEMO_CATEGORIES, PRESETS, draw_indexed, generation_params  # noqa: E402

NAMES = {category["id"]: category["name"] for category in DEMO_CATEGORIES}


def voc_xml(file_name: str, width: int, height: int, objects: list) -> str:
    """A VOC annotation: COCO ``[x, y, w, h]`` of whole pixels -> 1-based ``xmin ymin xmax ymax``."""
    parts = [f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(file_name)}</filename>\n"
             f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"]
    for obj in objects:
        x, y, w, h = (int(round(v)) for v in obj["bbox"])
        parts.append(f"  <object>\n    <name>{NAMES[obj['category_id']]}</name>\n    <difficult>0</difficult>\n"
                     f"    <bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax>"
                     f"<ymax>{y + h}</ymax></bndbox>\n  </object>\n")
    return "".join(parts) + "</annotation>\n"


def write_split(root: Path, split: str, params: dict) -> list:
    """Images and XML files of one split, drawn as the demo data with `params` draws them; returns the ids."""
    ids = []
    for index in tqdm(range(params["num_images"][split]), desc=f"VOC {split}", unit="img"):
        pixels, _, objects = draw_indexed(params, split, index)
        height, width = pixels.shape[:2]
        image_id = f"{split}_{index:05d}"
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", width, height, objects))
        ids.append(image_id)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return ids


def write_clip(path: Path, image_paths: list, fps: int) -> None:
    """The images as consecutive frames of an H.264 MP4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        first = np.asarray(Image.open(image_paths[0]).convert("RGB"))
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        for image_path in image_paths:
            frame = av.VideoFrame.from_ndarray(np.asarray(Image.open(image_path).convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(args) -> None:
    root = Path(args.output)
    # Without a preset, a smaller example than the demo's 3000 + 300 images: enough to try the steps.
    num_train, num_val = args.num_train, args.num_val
    if args.preset is None:
        num_train, num_val = (1000 if num_train is None else num_train), (100 if num_val is None else num_val)
    params = generation_params(num_train, num_val, args.image_size, args.seed, ("train", "val"), None, args.preset)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    write_split(root, "train", params)
    val_ids = write_split(root, "val", params)
    counts = params["num_images"]
    print(f"VOC folder: {root} ({counts['train']} train, {counts['val']} val images, classes "
          f"{', '.join(NAMES.values())})")
    if args.video:
        write_clip(Path(args.video), [root / "JPEGImages" / f"{i}.jpg" for i in val_ids], args.fps)
        print(f"clip of the val images: {args.video} ({counts['val']} frames at {args.fps} fps)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("make_voc_example.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="data/shapes_voc", help="VOC root to write")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="draw a preset of the demo data (utils/data/demo_data.py PRESETS) instead of "
                             "the demo's images; large: 24 + 8 images of 2000-3000 px, objects of 10-40 px")
    parser.add_argument("--num-train", type=int, default=None, help="train images (None: 1000, or the preset's)")
    parser.add_argument("--num-val", type=int, default=None, help="val images (None: 100, or the preset's)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (None: 160, or the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images")
    parser.add_argument("--video", help="also write the val images as this MP4 clip")
    parser.add_argument("--fps", type=int, default=5, help="frames per second of --video")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
