"""Video: probe containers with PyAV, decode only a clip's frames, make VideoMAE/contrastive views.

`decode` reads the container's metadata only (frame count, size, rate) and enforces the limits,
and keeps the container open in the VideoInfo for the clips (one FFmpeg open per sample, not one
per clip); `sample` seeks to the keyframe at or before the clip start and decodes forward, keeping frames
start, start+stride, ..., start+(frames-1)*stride. A clip index with no frame of its own (a
variable-rate file, or an AVI with dropped frames) takes the latest earlier frame, as a player
shows it; a video shorter than the clip repeats its last frame. Every clip uses one crop box,
one flip and one jitter for all of its frames. Views are uint8 [T, size, size, C]:
- `two` (contrastive): two independent clip starts, each with crop, flip, jitter and gray;
- `single` (VideoMAE): one clip with crop and flip only;
- `order` (VCOP): `clips` [n, t, size, size, C], n sub-clips shuffled by the `order` label (clip_order.py);
- eval: the centred clip, shorter side resized to `size`, centre crop, no augmentation.
Scaling and colour conversion run in one swscale pass (area filter) on the frames kept.

Decoding runs with FFmpeg's `err_detect=explode`, so a corrupt packet raises DecodeError
instead of being concealed, and a file that ends well before its header's frame count (more
than a second or 2% short) is called truncated.

`reencode_mp4` turns any video into constant-rate H.264 MP4 with a short keyframe interval
(seeks then decode at most keyframe_interval - 1 extra frames); `encode_clip_mp4` writes frames.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from selfsup.pipeline.buffers import Buffer, buffer_file
from selfsup.pipeline.media import EXTENSIONS
from selfsup.pipeline.modalities import MODALITIES
from selfsup.pipeline.modalities.base import DecodeError, Sample, float_pair, media_member
from selfsup.pipeline.modalities.clip_order import blank_tuple, check_order_args, shuffle_tuple, tuple_indices
from selfsup.pipeline.modalities.image import crop_box, grayscale

cv2.setNumThreads(1)

OUTPUTS = ("two", "single", "order")


@dataclass(frozen=True)
class VideoInfo:
    """A probed video: its bytes (or a view of them) and the metadata a clip needs (no frames decoded)."""

    data: Buffer
    frames: int  # from the header, or estimated from duration × rate when `estimated`
    width: int
    height: int
    fps: float
    time_base: Fraction
    start_pts: int
    seconds: float
    estimated: bool = False
    # the probe's container, still open, then each clip's after it: the next clip seeks in it instead of opening
    # the file again (an open is FFmpeg's stream probe; three per two-view sample were 7% of a video stream's CPU)
    spare: list[tuple[Any, Any, bool]] = field(default_factory=list, init=False, repr=False, compare=False)  # (container, stream, unread)


def open_video(data: Buffer) -> tuple[Any, Any]:
    """(container, first video stream) decoding on one thread, strict about corrupt data."""
    import av  # PyAV loads with the first video: a machine without it still trains images and audio
    try:
        container = av.open(buffer_file(data))
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many types for junk
        raise DecodeError(f"FFmpeg cannot open this video: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise DecodeError("container has no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1
    stream.codec_context.options = {"err_detect": "explode"}
    return container, stream


def probe_video(data: Buffer, max_frames: int, max_pixels: int, max_seconds: float) -> VideoInfo:
    """Metadata of the first video stream, checked against the limits; DecodeError names the one hit."""
    container, stream = open_video(data)
    try:
        info = video_info(data, container, stream, max_frames, max_pixels, max_seconds)
    except BaseException:
        container.close()
        raise
    info.spare.append((container, stream, True))  # unread: the first clip decodes from it as it is
    return info


def video_info(data: Buffer, container: Any, stream: Any, max_frames: int, max_pixels: int, max_seconds: float
               ) -> VideoInfo:
    """`probe_video`'s metadata from its open container."""
    import av
    width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    tb = stream.time_base or Fraction(1, 1_000_000)
    if stream.duration:
        seconds = float(stream.duration * tb)
    else:
        seconds = float(container.duration or 0) / av.time_base
    frames, start = int(stream.frames or 0), int(stream.start_time or 0)
    if width <= 0 or height <= 0 or not rate or rate <= 0:
        raise DecodeError(f"video stream has no usable size or frame rate ({width}x{height}, rate {rate})")
    fps = float(rate)
    estimated = frames <= 0
    if estimated:
        frames = int(round(seconds * fps))
    if frames <= 0:
        raise DecodeError("video length unknown: the header gives neither a frame count nor a duration")
    if width * height > max_pixels:
        raise DecodeError(f"video is {width}x{height} = {width * height} pixels per frame, over "
                          f"max_pixels_per_frame={max_pixels}: downscale it (shards write --reencode)")
    if frames > max_frames:
        raise DecodeError(f"video has {frames} frames, over max_frames={max_frames}: split it or raise the limit")
    if max(seconds, frames / fps) > max_seconds:
        raise DecodeError(f"video is {max(seconds, frames / fps):.0f} s long, over max_seconds={max_seconds}: "
                          "split it or raise the limit")
    return VideoInfo(data, frames, width, height, fps, tb, start, seconds, estimated)


# ---------------------------------------------------------------- reading a clip


def clip_indices(total: int, frames: int, stride: int, start: int) -> list[int]:
    """Frame indices start, start+stride, ... (frames of them), clamped to the last frame."""
    return [min(start + k * stride, total - 1) for k in range(frames)]


def clip_start(total: int, frames: int, stride: int, rng: np.random.Generator | None) -> int:
    """A random clip start (with rng) or the centred one, so the clip fits when the video allows."""
    room = max(0, total - ((frames - 1) * stride + 1))
    return int(rng.integers(0, room + 1)) if rng is not None else room // 2


def frame_index(frame: Any, info: VideoInfo, previous: int, seeked: bool) -> int:
    """The frame's index on the stream's constant-rate grid (counted on when it has no pts)."""
    if frame.pts is None:
        if seeked:  # after a seek, counting cannot tell where we are
            raise DecodeError("video frames carry no timestamps, so clips cannot seek: re-encode it "
                              "(selfsup shards write --reencode)")
        return previous + 1
    return int(round(float((frame.pts - info.start_pts) * info.time_base) * info.fps))


def decoded_frames(info: VideoInfo, first: int) -> Iterator[tuple[int, Any]]:
    """(index, frame) from the keyframe at or before `first` to the end; DecodeError on corrupt data.

    Decodes in the container `info` keeps (the probe's, unread; or a clip's, which a clip that
    seeks reuses: seeking flushes the decoder), else opens the video; afterwards the container
    goes back to `info` for the next clip, unless decoding failed. A clip from frame 0 never seeks,
    so files without timestamps still give it: it takes an unread container or opens one.
    """
    import av
    container, stream, unread = info.spare.pop() if info.spare else (None, None, False)
    if container is not None and not unread and first <= 0:
        container.close()
        container = None
    if container is None:
        container, stream = open_video(info.data)
    reusable = False
    try:
        if first > 0:  # half a frame past the target, so rounding never lands one keyframe early
            target = info.start_pts + int((first + 0.5) / info.fps / info.time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)
        index = -1
        for frame in container.decode(stream):
            index = frame_index(frame, info, index, first > 0)
            yield index, frame
        reusable = True
    except GeneratorExit:  # the reader has its frames and stops here
        reusable = True
        raise
    except DecodeError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(f"corrupt video data: {type(e).__name__}: {e}") from None
    finally:
        if reusable:
            info.spare.append((container, stream, False))
        else:
            container.close()


def read_frames(info: VideoInfo, indices: Sequence[int], fmt: str, width: int, height: int) -> list[np.ndarray]:
    """The frames at non-decreasing `indices`, scaled to uint8 [height, width, C]; converts only those kept.

    Scaling and colour conversion are one swscale pass (area filter), cheaper than converting
    full-size frames and resizing them after.
    """
    out: list[np.ndarray] = []
    cache: dict[int, np.ndarray] = {}
    prev: tuple[int, Any] | None = None
    last = -1

    def array(index: int, frame: Any) -> np.ndarray:
        if index not in cache:
            img = frame.reformat(width=width, height=height, format=fmt, interpolation="AREA").to_ndarray()
            cache[index] = img[:, :, None] if img.ndim == 2 else img
        return cache[index]

    for index, frame in decoded_frames(info, indices[0]):
        last = index
        while len(out) < len(indices) and indices[len(out)] <= index:
            # an index without its own frame shows the latest earlier one
            use = (index, frame) if indices[len(out)] == index or prev is None else prev
            out.append(array(*use))
        if len(out) == len(indices):
            return out
        prev = (index, frame)
    if prev is None:
        raise DecodeError(f"no frame decodes at or after frame {indices[0]} (of {info.frames})")
    slack = max(int(round(info.fps)), info.frames // 50) * (2 if info.estimated else 1)
    if last < min(indices[-1], info.frames - 1) - slack:
        raise DecodeError(f"video ends at frame {last} but its header promises {info.frames} (truncated?)")
    while len(out) < len(indices):  # shorter than promised, within slack: repeat the last frame
        out.append(array(*prev))
    return out


# ---------------------------------------------------------------- spatial and photometric ops


def crop_plan(box: tuple[int, int, int, int], height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(frame width, frame height, top, left): scale frames so the box becomes size×size, crop there."""
    top, left, h, w = box
    fx, fy = size / w, size / h
    sw, sh = max(size, round(width * fx)), max(size, round(height * fy))
    return sw, sh, min(round(top * fy), sh - size), min(round(left * fx), sw - size)


def center_plan(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(frame width, frame height, top, left): shorter side to size, centred size×size crop."""
    sw, sh = (max(size, round(width * size / height)), size) if height <= width else \
        (size, max(size, round(height * size / width)))
    return sw, sh, (sh - size) // 2, (sw - size) // 2


def jitter_clip(clip: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float) -> np.ndarray:
    """Brightness then contrast, the same factors (one LUT) for every frame of [T, H, W, C]."""
    ramp = np.arange(256, dtype=np.float32) * rng.uniform(1 - brightness, 1 + brightness)
    mean = float(clip.mean()) * (ramp[255] / 255.0)
    table = (ramp - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    lut = np.clip(table, 0, 255).astype(np.uint8)
    t, h, w, c = clip.shape
    return cv2.LUT(np.ascontiguousarray(clip).reshape(t * h, w, c), lut).reshape(clip.shape)


def gray_clip(clip: np.ndarray) -> np.ndarray:
    """Every frame of [T, H, W, C] in gray, keeping C channels."""
    t, h, w, c = clip.shape
    return grayscale(clip.reshape(t * h, w, c)).reshape(t, h, w, c)


@MODALITIES.register("video")
class VideoModality:
    """Videos → two contrastive clip views, one VideoMAE clip, or the centred eval clip."""

    name = "video"
    extensions = EXTENSIONS["video"]
    member_views = True  # clips arrive as views of the shard: a clip's seek reads only the part it decodes

    def __init__(self, frames: int = 16, stride: int = 2, size: int = 112, channels: int = 3,
                 output: str = "two", scale: tuple[float, float] = (0.3, 1.0), flip: bool = True,
                 jitter: tuple[float, float] = (0.4, 0.4), jitter_p: float = 0.8, gray_p: float = 0.2,
                 max_frames: int = 100_000, max_pixels_per_frame: int = 8_000_000, max_seconds: float = 3600.0,
                 max_bytes: int = 2_000_000_000, order_clips: int = 3, order_clip_frames: int = 4,
                 order_gap: int = 0) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"video output {output!r} unknown; valid: {', '.join(OUTPUTS)}")
        if channels not in (1, 3):
            raise ValueError(f"video channels must be 1 or 3, got {channels}")
        if frames < 1 or stride < 1 or size < 1:
            raise ValueError(f"video frames, stride and size must be positive, got {frames}, {stride}, {size}")
        self.frames, self.stride, self.size, self.channels = int(frames), int(stride), int(size), int(channels)
        self.output, self.flip, self.jitter = output, bool(flip), tuple(jitter)
        self.scale = float_pair(scale, "video scale")
        self.jitter_p, self.gray_p = float(jitter_p), float(gray_p)
        self.max_frames, self.max_pixels, self.max_seconds = int(max_frames), int(max_pixels_per_frame), max_seconds
        self.max_bytes = int(max_bytes)
        self.fmt = "gray" if self.channels == 1 else "rgb24"
        check_order_args(order_clips, order_clip_frames, order_gap)
        self.order_clips, self.order_clip_frames, self.order_gap = order_clips, order_clip_frames, order_gap

    def decode(self, members: Mapping[str, bytes]) -> VideoInfo:
        """The video's bytes and metadata, limits checked; frames are decoded by `sample`."""
        ext, data = media_member(members, self.extensions, self.name)
        if len(data) > self.max_bytes:
            raise DecodeError(f"video member .{ext} is {len(data)} bytes, over max_bytes={self.max_bytes}")
        return probe_video(data, self.max_frames, self.max_pixels, float(self.max_seconds))

    def clip(self, info: VideoInfo, rng: np.random.Generator | None, box: tuple[int, int, int, int] | None
             ) -> np.ndarray:
        """uint8 [T, size, size, C]: a random (rng) clip cropped to `box`, or the centred eval clip."""
        start = clip_start(info.frames, self.frames, self.stride, rng)
        return self.frames_at(info, clip_indices(info.frames, self.frames, self.stride, start), box)

    def frames_at(self, info: VideoInfo, indices: list[int], box: tuple[int, int, int, int] | None) -> np.ndarray:
        """uint8 [len(indices), size, size, C]: frames at non-decreasing `indices` cropped to `box` (None: centred)."""
        if box is None:
            sw, sh, top, left = center_plan(info.height, info.width, self.size)
        else:
            sw, sh, top, left = crop_plan(box, info.height, info.width, self.size)
        frames = read_frames(info, indices, self.fmt, sw, sh)
        return np.stack([f[top: top + self.size, left: left + self.size] for f in frames])

    def view(self, info: VideoInfo, rng: np.random.Generator, photometric: bool) -> np.ndarray:
        """One augmented clip uint8 [T, size, size, C]: crop, flip, then jitter and gray if photometric."""
        return self.augment(self.clip(info, rng, crop_box(rng, info.height, info.width, self.scale)), rng, photometric)

    def augment(self, out: np.ndarray, rng: np.random.Generator, photometric: bool) -> np.ndarray:
        """Flip, then jitter and gray if photometric, each drawn once for all frames of [T, H, W, C]."""
        if self.flip and rng.random() < 0.5:
            out = out[:, :, ::-1]
        if photometric and rng.random() < self.jitter_p:
            out = jitter_clip(out, rng, *self.jitter)
        if photometric and self.channels == 3 and rng.random() < self.gray_p:
            out = gray_clip(np.ascontiguousarray(out))
        return np.ascontiguousarray(out)

    def sample(self, decoded: Any, rng: np.random.Generator, train: bool) -> Sample:
        """Two views from independent clips (two), one cropped clip (single), or the eval clip."""
        if not train:
            return {"video": self.clip(decoded, None, None)}
        if self.output == "single":
            return {"video": self.view(decoded, rng, photometric=False)}
        if self.output == "order":
            return self.order_tuple(decoded, rng)
        return {"view1": self.view(decoded, rng, photometric=True),
                "view2": self.view(decoded, rng, photometric=True)}

    def order_tuple(self, info: VideoInfo, rng: np.random.Generator) -> Sample:
        """`clips` [n, t, size, size, C] shuffled by `order` (clip_order.py): one crop, flip and jitter for all."""
        box = crop_box(rng, info.height, info.width, self.scale)
        indices = tuple_indices(info.frames, self.order_clips, self.order_clip_frames, self.stride, self.order_gap, rng)
        return shuffle_tuple(self.augment(self.frames_at(info, indices, box), rng, True), self.order_clips, rng)

    def blank(self, train: bool) -> Sample:
        """Zero arrays shaped like `sample`'s."""
        if train and self.output == "order":
            return blank_tuple(self.order_clips, self.order_clip_frames, self.size, self.channels)
        z = np.zeros((self.frames, self.size, self.size, self.channels), np.uint8)
        if not train or self.output == "single":
            return {"video": z}
        return {"view1": z, "view2": z.copy()}

    def token_grid(self, geometry: Mapping[str, Any]) -> tuple[int, ...]:
        """(T/t, H/p, W/p) tubelets."""
        from selfsup.pipeline.masking import grid_from_geometry

        return grid_from_geometry((self.frames, self.size, self.size, self.channels), geometry, "video")

    def valid_tokens(self, sample: Sample, geometry: Mapping[str, Any]) -> int:
        """Every tubelet is real."""
        return int(np.prod(self.token_grid(geometry)))


# ---------------------------------------------------------------- encoding


def h264_available() -> bool:
    """Whether PyAV's FFmpeg has libx264 (else MP4s are written with MPEG-4 part 2)."""
    import av
    return "libx264" in av.codecs_available


def encode_mp4(frames: Iterable[np.ndarray], width: int, height: int, rate: Fraction, keyframe_interval: int,
               crf: int, pix_fmt: str, codec: str | None = None) -> bytes:
    """MP4 bytes of uint8 [H, W, 3] RGB frames at a constant `rate`, a keyframe every keyframe_interval."""
    import av
    if keyframe_interval < 1:
        raise ValueError(f"keyframe_interval must be >= 1, got {keyframe_interval}")
    codec = codec or ("libx264" if h264_available() else "mpeg4")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        if codec == "libx264":  # fastdecode (no CABAC, no deblocking): ~3x faster decode for ~10% more bytes
            params = f"keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0:bframes=0:threads=1"
            options = {"crf": str(crf), "preset": "fast", "tune": "fastdecode", "x264-params": params}
        else:
            options = {"g": str(keyframe_interval), "bf": "0", "flags": "+qscale", "global_quality": str(2 * 118)}
            pix_fmt = "yuv420p"
        stream = out.add_stream(codec, rate=rate, options=options)
        if not isinstance(stream, av.VideoStream):
            raise ValueError(f"codec {codec!r} is not a video codec")
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        n = 0
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = n
            n += 1
            out.mux(stream.encode(frame))
        if n == 0:
            raise ValueError("no frames to encode")
        out.mux(stream.encode(None))
    return buf.getvalue()


def encode_clip_mp4(frames: np.ndarray, fps: int, keyframe_interval: int = 8, crf: int = 12) -> bytes:
    """MP4 of uint8 [T, H, W, 3] frames, near-lossless (H.264 crf 12, 4:4:4 chroma) for small clips."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    return encode_mp4(iter(frames), w, h, Fraction(int(fps)), keyframe_interval, crf, "yuv444p")


def even_size(info: VideoInfo, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most max_side, rounded down to even (4:2:0)."""
    scale = min(1.0, max_side / max(info.width, info.height)) if max_side else 1.0
    return int(info.width * scale) // 2 * 2, int(info.height * scale) // 2 * 2


def constant_rate_frames(info: VideoInfo, width: int, height: int) -> Iterator[np.ndarray]:
    """Every frame slot of the video at its average rate as RGB [H, W, 3] (gaps repeat the last frame)."""
    last, written = None, 0
    for index, frame in decoded_frames(info, 0):
        img = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
        while written < index and last is not None:  # dropped slots show the previous frame
            yield last
            written += 1
        if index >= written:
            yield img
            written = index + 1
        last = img


def reencode_mp4(data: bytes, keyframe_interval: int = 8, crf: int = 20, max_side: int | None = None,
                 max_frames: int = 100_000, max_pixels_per_frame: int = 8_000_000,
                 max_seconds: float = 3600.0) -> bytes:
    """Any video → constant-rate H.264 (4:2:0) MP4 with a keyframe every keyframe_interval frames.

    Audio and other streams are dropped; `max_side` downscales the longer side. Raises
    DecodeError for input that does not decode or is over the limits.
    """
    info = probe_video(data, max_frames, max_pixels_per_frame, max_seconds)
    w, h = even_size(info, max_side)
    if w < 2 or h < 2:
        raise DecodeError(f"video of {info.width}x{info.height} is too small to encode as H.264 4:2:0")
    rate = Fraction(info.fps).limit_denominator(1001)
    return encode_mp4(constant_rate_frames(info, w, h), w, h, rate, keyframe_interval, crf, "yuv420p")
