"""Detection on video files through PyAV: frames streamed in, a drawn video and per-frame JSON out.

:func:`process_video` decodes a video frame by frame, hands every ``every``-th frame
to a detector in batches, and encodes every frame, with the boxes of the latest
detected frame drawn on it, into an MP4 of the input's frame rate and exact size.
Frames are held only until their batch is detected (a bounded number, whatever the
video's length), and the per-frame JSON is streamed to disk, so memory stays flat on
an hour of footage.

Odd frame sizes: H.264 in 4:2:0 (``yuv420p``, what every player decodes) needs even
sizes, so an odd-sized video is encoded in 4:4:4 (``yuv444p``, H.264 High 4:4:4):
the size stays exact, though some players (browsers, QuickTime) do not decode it.

Broken inputs: a packet that does not decode is skipped and counted; when the file ends
early (a copy cut short) the frames that decoded are processed and the JSON says the
video is incomplete. An MP4 whose index (``moov``) was at the end and is cut off
cannot be opened at all and raises :class:`VideoReadError`. The rotation flag phones
write is not applied: frames are drawn as they are stored.
"""
import json
import logging
import os
from fractions import Fraction

import av
import numpy as np
import torch
from tqdm import tqdm

from utils.runtime.atomic_io import atomic_write

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
MAX_BUFFERED_BYTES = 256 * 2 ** 20   # decoded frames held while their batch waits for the detector
MAX_BAD_PACKETS = 100                # more undecodable packets than this: the file is not worth going on with


class VideoReadError(OSError):
    """A video file that cannot be opened or holds no video stream."""


def is_video_file(path) -> bool:
    return os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


class VideoFrames:
    """Decoded frames of a file's first video stream: iterate for ``(index, timestamp s, av.VideoFrame)``.

    ``width``, ``height``, ``fps`` (a Fraction), ``expected_frames`` (from the container, 0 if unknown);
    after iterating, ``num_bad_packets`` and ``error`` (None, or why decoding stopped early).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.container = av.open(self.path)
        except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise VideoReadError(f"cannot open video '{self.path}': {exc}") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoReadError(f"cannot use '{self.path}': it holds no video stream")
        self.stream = self.container.streams.video[0]
        # Slice threads only (PyAV's default): frame threading delays frames, and on a damaged
        # packet the frames it still holds are lost with the error.
        context = self.stream.codec_context
        self.width, self.height = context.width, context.height
        self.fps = Fraction(self.stream.average_rate or self.stream.guessed_rate or 25)
        duration = (float(self.stream.duration * self.stream.time_base) if self.stream.duration
                    else self.container.duration / av.time_base if self.container.duration else 0.0)
        self.expected_frames = self.stream.frames or round(duration * self.fps)
        self.num_bad_packets, self.error = 0, None

    def timestamp(self, frame, index: int) -> float:
        """Seconds from the stream's start: from the frame's pts, else from its index and the frame rate."""
        if frame.pts is None:
            return float(index / self.fps)
        return float((frame.pts - (self.stream.start_time or 0)) * self.stream.time_base)

    def __iter__(self):
        index = 0
        try:
            for packet in self.container.demux(self.stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError as exc:  # a damaged packet: skip it, keep the rest
                    self.num_bad_packets += 1
                    if self.num_bad_packets > MAX_BAD_PACKETS:
                        self.error = f"more than {MAX_BAD_PACKETS} packets failed to decode, last: {exc}"
                        return
                    continue
                for frame in frames:
                    yield index, self.timestamp(frame, index), frame
                    index += 1
        except av.FFmpegError as exc:  # the container itself breaks off
            self.error = f"reading stopped after {index} frames: {exc}"
        finally:
            self.container.close()
        if self.error is None and self.expected_frames and index < self.expected_frames - 1:
            self.error = f"only {index} of the {self.expected_frames} frames the file announces could be decoded"


class VideoWriter:
    """An H.264 MP4 at ``fps`` and exactly ``width`` x ``height``; ``write(ByteTensor[3, H, W] RGB)``."""

    def __init__(self, path, width: int, height: int, fps: Fraction):
        self.container = av.open(os.fspath(path), "w")
        odd = width % 2 or height % 2
        if "libx264" in av.codecs_available:
            self.stream = self.container.add_stream("libx264", rate=fps,
                                                    options={"crf": "20", "preset": "veryfast"})
            self.stream.pix_fmt = "yuv444p" if odd else "yuv420p"
        else:  # PyAV builds without x264: MPEG-4 part 2 takes any size in 4:2:0
            self.stream = self.container.add_stream("mpeg4", rate=fps)
            self.stream.pix_fmt = "yuv420p"
            self.stream.bit_rate = max(1_000_000, int(width * height * float(fps) * 0.2))
        self.stream.width, self.stream.height = width, height
        self.num_frames = 0

    def write(self, image: torch.Tensor) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()), format="rgb24")
        frame.pts = self.num_frames
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.num_frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():  # flush the encoder's delayed frames
            self.container.mux(packet)
        self.container.close()


def process_video(path, video_out, json_out, detect, draw, describe, every: int = 1, batch_size: int = 4) -> dict:
    """Detect objects in a video file; write the drawn video and the per-frame JSON.

    Args:
        detect: ``list of ByteTensor[3, H, W] -> list of detections`` (whatever ``draw`` and
            ``describe`` take), one call per batch of up to ``batch_size`` frames.
        draw: ``(frame ByteTensor[3, H, W], detections) -> drawn ByteTensor[3, H, W]``.
        describe: ``(frame, detections) -> JSON-ready list`` for the frame's record.
        every: detect on frames 0, every, 2 * every, ...; the frames between are written
            with the boxes of the last detected frame, so the video keeps every frame.

    ``json_out`` holds ``{"video", "output_file", "width", "height", "fps", "every",
    "frames": [{"frame_index", "timestamp", "detections"}] (detected frames), "num_frames",
    "complete", "error"}``. Returns the same without "frames", plus ``num_detections``.
    """
    frames = VideoFrames(path)
    frame_bytes = frames.width * frames.height * 3
    max_buffered = max(batch_size, MAX_BUFFERED_BYTES // max(frame_bytes, 1))
    writer = VideoWriter(video_out, frames.width, frames.height, frames.fps)
    header = {"video": os.path.abspath(path), "output_file": os.path.basename(video_out), "width": frames.width,
              "height": frames.height, "fps": round(float(frames.fps), 4), "every": every}
    totals = {"num_detections": 0, "num_detected_frames": 0}

    def stream_json(f):
        f.write(json.dumps(header)[:-1] + ', "frames": [')
        pending, latest = [], None  # pending: (index, timestamp, av.VideoFrame, detect it?)

        def flush():
            nonlocal latest
            images = [torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                      for _, _, frame, _ in pending]
            to_detect = [image for image, item in zip(images, pending) if item[3]]
            found = iter(detect(to_detect) if to_detect else [])
            for image, (index, timestamp, _, detected) in zip(images, pending):
                if detected:
                    latest = next(found)
                    record = {"frame_index": index, "timestamp": round(timestamp, 4),
                              "detections": describe(image, latest)}
                    f.write(("" if totals["num_detected_frames"] == 0 else ",") + "\n" + json.dumps(record))
                    totals["num_detected_frames"] += 1
                    totals["num_detections"] += len(record["detections"])
                writer.write(draw(image, latest) if latest is not None else image)
                progress.update(1)
            pending.clear()

        with tqdm(total=frames.expected_frames or None, unit="frame", desc=os.path.basename(path)) as progress:
            for index, timestamp, frame in frames:
                pending.append((index, timestamp, frame, index % every == 0))
                if sum(item[3] for item in pending) >= batch_size or len(pending) >= max_buffered:
                    flush()
            if pending:
                flush()
        footer = {"num_frames": writer.num_frames, "complete": frames.error is None, "error": frames.error}
        f.write("\n], " + json.dumps(footer)[1:] + "\n")

    try:
        atomic_write(json_out, stream_json, binary=False)
    finally:
        writer.close()
    if frames.num_bad_packets:
        logger.warning("%s: %d packets could not be decoded and were skipped", path, frames.num_bad_packets)
    if frames.error is not None:
        logger.warning("%s is broken or truncated: %s; the %d frames that decoded are kept", path, frames.error,
                       writer.num_frames)
    return {**header, "num_frames": writer.num_frames, "complete": frames.error is None, "error": frames.error,
            **totals, "frames_file": os.path.basename(json_out)}
