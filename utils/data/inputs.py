"""The files an inference run reads and writes: input listing, output names, the output folder, image loading.

:func:`list_images` expands ``--input`` values (files, folders, quoted globs) into image and
video paths; :func:`output_names` and :func:`frames_file_name` give each its output file
name; :func:`check_outputs` and :func:`make_output_dir` guard and create the output folder;
:func:`image_loader` decodes the images in worker processes, a bad file coming through as a
value (:class:`ImageFiles`) so that one corrupt image skips itself, not the run.
"""
import glob
import logging
import os
import re
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from utils.data.image_io import IMAGE_EXTENSIONS, ImageReadError, is_image_file, read_image
from utils.runtime.errors import InferenceError
from utils.visual.video import VIDEO_EXTENSIONS, is_video_file

logger = logging.getLogger(__name__)


def list_images(inputs, recursive: bool = False):
    """Expand --input values into ``(absolute image paths in order, each once; number of missing inputs)``.

    A folder or glob contributes only files with an image extension; a file named
    explicitly is always taken, so an unreadable one is reported rather than ignored.
    """
    found, num_missing = [], 0
    for item in inputs:
        if os.path.isdir(item):
            if recursive:
                paths = [os.path.join(root, name) for root, dirs, names in os.walk(item) for name in names]
            else:
                paths = [entry.path for entry in os.scandir(item) if entry.is_file()]
            paths = sorted(path for path in paths if is_image_file(path) or is_video_file(path))
        elif os.path.isfile(item):
            paths = [item]
        elif glob.has_magic(item):
            paths = sorted(path for path in glob.glob(item, recursive=recursive)
                           if os.path.isfile(path) and (is_image_file(path) or is_video_file(path)))
        else:
            logger.warning("skipped input %s: no such file or folder", item)
            num_missing += 1
            continue
        if not paths:
            logger.warning("input %s: no image or video files (extensions %s)", item,
                           " ".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS))
        found.extend(os.path.abspath(path) for path in paths)
    return list(dict.fromkeys(found)), num_missing


def output_names(paths, extension: str) -> list:
    """``<stem>.<extension>`` per input; repeated stems (a.jpg + a.png, or two folders) get ``_2``, ``_3``."""
    names, taken = [], set()
    for path in paths:
        stem = Path(path).stem
        name, count = f"{stem}.{extension}", 1
        while name.lower() in taken:  # lower(): case-insensitive file systems would merge A.jpg and a.jpg
            count += 1
            name = f"{stem}_{count}.{extension}"
        taken.add(name.lower())
        names.append(name)
    return names


def frames_file_name(video_name: str) -> str:
    """The per-frame JSON beside a drawn video: ``clip.mp4`` -> ``clip_frames.json``."""
    return f"{Path(video_name).stem}_frames.json"


def check_outputs(output_dir, names, inputs, overwrite: bool) -> None:
    """Refuse to clobber an earlier run's results in --output-dir without --overwrite, and an input image ever."""
    if output_dir is None:
        return  # a fresh run folder is made for us
    targets = [Path(output_dir) / name for name in names]
    clobbered_inputs = set(map(os.path.realpath, inputs)) & {os.path.realpath(t) for t in targets}
    if clobbered_inputs:
        raise InferenceError(f"--output-dir {output_dir} would overwrite input image {sorted(clobbered_inputs)[0]}; "
                             "choose another output directory")
    existing = [t.name for t in targets + [Path(output_dir) / "detections.json"] if t.exists()]
    if existing and not overwrite:
        raise InferenceError(f"{output_dir} already holds {len(existing)} of this run's output files "
                             f"(e.g. {existing[0]}); pass --overwrite to replace them or choose another --output-dir")


def make_output_dir(output_dir) -> Path:
    """Create --output-dir, or without one a new ``inference_output/run_<N>`` (N one above the highest there)."""
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return Path(output_dir)
    parent = Path("inference_output")
    parent.mkdir(exist_ok=True)
    runs = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"run_(\d+)", p.name))]
    number = max(runs, default=0) + 1
    while True:  # mkdir without exist_ok: two runs started together still get different folders
        try:
            (parent / f"run_{number}").mkdir()
            return parent / f"run_{number}"
        except FileExistsError:
            number += 1


def remove_if_empty(output_dir: Path) -> None:
    """Remove a run folder :func:`make_output_dir` made when the run wrote nothing into it."""
    if not any(output_dir.iterdir()):
        output_dir.rmdir()


class ImageFiles(Dataset):
    """``(index, ByteTensor[3, H, W] or None, error message or None)``: a bad file is a value, not an exception."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, read_image(self.paths[index]), None
        except ImageReadError as exc:
            return index, None, str(exc)


def keep_as_list(batch):
    return batch  # images differ in size; the model takes a list


def image_loader(paths, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches of :class:`ImageFiles` items, in ``paths`` order, decoded by up to ``workers`` processes."""
    return DataLoader(ImageFiles(paths), batch_size=batch_size, num_workers=min(workers, len(paths)),
                      collate_fn=keep_as_list, pin_memory=pin_memory)
