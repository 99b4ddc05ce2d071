"""Video in inference.py (utils/visual/video.py): a synthetic clip made here with PyAV, odd-sized, 2 s at 25 fps."""
import json
import logging

import av
import numpy as np
import pytest
import torch
from PIL import Image

import inference
from model import build_retinanet
from utils.runtime.checkpoint import save_checkpoint
from utils.runtime.errors import InferenceError
from utils.visual import video

WIDTH, HEIGHT, FPS, NUM_FRAMES = 65, 49, 12, 24  # 2 s
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 4, "name": "b"}]


def frame_pixels(index):
    """Frame ``index``: brightness rising with the index, a bar moving across, so order is visible."""
    noise = np.random.default_rng(index).integers(0, 40, (HEIGHT, WIDTH, 3))  # frames of some size to cut
    pixels = (40 + 3 * index + noise).astype(np.uint8)
    pixels[10:30, index % (WIDTH - 8):index % (WIDTH - 8) + 8] = (250, 30, 30)
    return pixels


def make_clip(path, num_frames=NUM_FRAMES):
    """An H.264 MP4 with its index in front (faststart), so a copy cut short still opens."""
    container = av.open(str(path), "w", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv444p"
    for index in range(num_frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pixels(index), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_retinanet(num_classes=2, backbone="resnet18", fpn_channels=16, head_convs=1, min_size=48,
                            max_size=64, prior_prob=0.5)  # untrained, every score about 0.5: boxes to draw
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                     "args": {}}, str(path))
    return path


def run(checkpoint, out, *inputs, extra=()):
    args = inference.get_args_parser().parse_args(
        ["--checkpoint", str(checkpoint), "--input", *map(str, inputs), "--output-dir", str(out),
         "--score-threshold", "0.3", "--workers", "0", "--batch-size", "4", *extra])
    return inference.main(args)


def test_clip_gives_a_drawn_video_of_the_same_frames_and_size_and_per_frame_json(clip, checkpoint, tmp_path):
    summary = run(checkpoint, tmp_path / "out", clip)
    frames, rate = decode(tmp_path / "out" / "clip.mp4")
    assert len(frames) == NUM_FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3) and rate == FPS
    source, _ = decode(clip)
    assert any(np.abs(a.astype(int) - b).max() > 100 for a, b in zip(frames, source))  # boxes drawn
    record = json.loads((tmp_path / "out" / "clip_frames.json").read_text())
    assert record["complete"] and record["error"] is None and record["num_frames"] == NUM_FRAMES
    assert (record["width"], record["height"], record["fps"]) == (WIDTH, HEIGHT, FPS)
    assert [f["frame_index"] for f in record["frames"]] == list(range(NUM_FRAMES))
    assert [f["timestamp"] for f in record["frames"]] == pytest.approx([i / FPS for i in range(NUM_FRAMES)], abs=1e-4)
    detections = record["frames"][0]["detections"]
    assert detections and {d["category_name"] for d in detections} <= {"a", "b"}
    assert all(0 <= d["box"][0] <= d["box"][2] <= WIDTH and 0 <= d["box"][1] <= d["box"][3] <= HEIGHT
               for d in detections)
    assert summary["videos"][0]["num_detections"] == sum(len(f["detections"]) for f in record["frames"])


def test_every_n_detects_on_sampled_frames_and_keeps_every_frame(clip, checkpoint, tmp_path):
    run(checkpoint, tmp_path / "out", clip, extra=["--every", "5"])
    record = json.loads((tmp_path / "out" / "clip_frames.json").read_text())
    assert [f["frame_index"] for f in record["frames"]] == list(range(0, NUM_FRAMES, 5))
    frames, _ = decode(tmp_path / "out" / "clip.mp4")
    assert len(frames) == NUM_FRAMES


def test_truncated_copy_is_reported_and_its_decoded_frames_kept(clip, checkpoint, tmp_path, caplog):
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    with caplog.at_level(logging.WARNING):
        summary = run(checkpoint, tmp_path / "out", cut)
    assert "cut.mp4 is broken or truncated" in caplog.text
    processed = summary["videos"][0]
    assert not processed["complete"] and processed["error"]
    assert 0 < processed["num_frames"] < NUM_FRAMES
    frames, _ = decode(tmp_path / "out" / "cut.mp4")
    assert len(frames) == processed["num_frames"]
    record = json.loads((tmp_path / "out" / "cut_frames.json").read_text())
    assert len(record["frames"]) == processed["num_frames"] and record["complete"] is False


def test_videos_and_images_in_one_call_and_an_unreadable_video_skipped(clip, checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(frame_pixels(3)).save(folder / "still.png")
    (folder / "clip.mkv").write_bytes(b"not a video at all")
    summary = run(checkpoint, tmp_path / "out", folder, clip)
    assert summary["num_images"] == 1 and summary["num_skipped"] == 1 and len(summary["videos"]) == 1
    images = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [image["file_name"] for image in images] == ["still.png"]
    # Output names are given before reading, as for images: the unreadable clip.mkv took clip.mp4.
    assert (tmp_path / "out" / "clip_2.mp4").is_file() and not (tmp_path / "out" / "clip.mp4").exists()
    with pytest.raises(InferenceError, match="none of the 1 input videos"):
        run(checkpoint, tmp_path / "only_bad", folder / "clip.mkv")


def test_frames_are_held_in_bounded_batches_in_order(clip, tmp_path, monkeypatch):
    batches = []

    def detect(frames):
        batches.append(len(frames))
        return [float(frame.float().mean()) for frame in frames]

    # Room for 3 decoded frames: with --every 10 the detector must run before 4 sampled frames pile up.
    monkeypatch.setattr(video, "MAX_BUFFERED_BYTES", WIDTH * HEIGHT * 3 * 3)
    summary = video.process_video(clip, tmp_path / "o.mp4", tmp_path / "o.json", detect, lambda frame, found: frame,
                                  lambda frame, found: [found], every=10, batch_size=4)
    assert summary["num_frames"] == NUM_FRAMES and max(batches) == 1 and sum(batches) == 3
    brightness = [record["detections"][0] for record in json.loads((tmp_path / "o.json").read_text())["frames"]]
    assert brightness == sorted(brightness)  # frames 0, 10, 20, ... in order
    written, _ = decode(tmp_path / "o.mp4")
    means = [frame.mean() for frame in written]
    assert len(means) == NUM_FRAMES and all(b > a for a, b in zip(means[::4], means[4::4]))
