"""Image bytes → pixels: the checks made from the bytes alone, then one OpenCV decode at the scale asked.

`check_image` reads the header only (size with EXIF orientation applied, the pixel limit, truncation)
and returns an `EncodedImage`; nothing is decoded yet, so a hostile or huge file is refused before
any pixel buffer exists. `decode_pixels` decodes it, a JPEG at 1/2, 1/4 or 1/8 where asked
(libjpeg's DCT scaling, OpenCV IMREAD_REDUCED_*: the reduction is part of the inverse DCT, so it
costs less than the full decode and filters like an area resize). `dct_factor` picks the scale
from the crop boxes the views will cut (see image.py) and `reduced_box` maps a box to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from selfsup.pipeline.buffers import Buffer, buffer_file
from selfsup.pipeline.modalities.base import DecodeError

cv2.setNumThreads(1)
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit from the header, before decoding


def image_size(data: Buffer) -> tuple[int, int]:
    """(width, height) as the decoders show it (EXIF orientation applied), from the header alone.

    DecodeError if unreadable. OpenCV turns JPEG/PNG/WebP pixels upright by their EXIF orientation,
    so orientations 5-8 (a quarter turn) swap the stored sides.
    """
    try:
        with Image.open(buffer_file(data)) as im:
            w, h = im.size
            try:
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)
            except Exception:  # noqa: BLE001 - bad EXIF: decoders ignore it too (decode_pixels checks)
                turned = False
    except Exception as e:  # noqa: BLE001 - PIL raises many types for junk
        raise DecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None
    return (h, w) if turned else (w, h)


def check_complete(ext: str, data: Buffer) -> None:
    """Raise DecodeError for truncated files that decoders would return partially."""
    tail = bytes(data[-1024:]).rstrip(b"\x00\r\n\t ")
    if ext in ("jpg", "jpeg") and not tail.endswith(b"\xff\xd9"):
        raise DecodeError("truncated JPEG (no end-of-image marker)")
    if ext == "png" and b"IEND" not in bytes(data[-64:]):
        raise DecodeError("truncated PNG (no IEND chunk)")
    if ext == "webp" and (len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)):
        raise DecodeError("truncated WebP (RIFF size exceeds the data)")


@dataclass(frozen=True)
class EncodedImage:
    """An image checked from its bytes alone (header size within max_pixels, not truncated), not yet decoded."""

    ext: str
    data: Buffer  # bytes, or a read-only view of them (pipeline/buffers.py)
    height: int  # as decoded (EXIF orientation applied)
    width: int


def check_image(ext: str, data: Buffer, max_pixels: int) -> EncodedImage:
    """The resource checks, before any pixel is decoded; DecodeError naming what is wrong."""
    w, h = image_size(data)
    if w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    check_complete(ext, data)
    return EncodedImage(ext, data, h, w)


def dct_factor(ext: str, sides: Iterable[tuple[int, int]]) -> int:
    """The largest JPEG DCT scale-down f in 8, 4, 2 (else 1; always 1 for PNG/WebP) such that every
    (box's shorter side, the side it is resized to) pair has side / f >= output side: no box is
    upsampled from a reduced decode where the full decode would have been downsampled."""
    if ext not in ("jpg", "jpeg"):
        return 1
    pairs = list(sides)
    return next((f for f in (8, 4, 2) if all(short >= f * out for short, out in pairs)), 1)


def decode_pixels(image: EncodedImage, channels: int, factor: int = 1) -> np.ndarray:
    """uint8 [ceil(H/f), ceil(W/f), channels] RGB (or gray); a JPEG at 1/factor by libjpeg's DCT scaling."""
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    if factor > 1:  # IMREAD_REDUCED_{GRAYSCALE,COLOR}_{2,4,8}
        flag = {2: 16, 4: 32, 8: 64}[factor] + (0 if channels == 1 else 1)
    img = cv2.imdecode(np.frombuffer(image.data, np.uint8), flag)
    if img is None:
        raise DecodeError(f"OpenCV could not decode this .{image.ext}")
    if img.shape[:2] != (-(-image.height // factor), -(-image.width // factor)):
        raise DecodeError(f".{image.ext} decoded to {img.shape[1]}x{img.shape[0]} at 1/{factor}, but its header "
                          f"says {image.width}x{image.height}")
    if channels == 1:
        return img[:, :, None] if img.ndim == 2 else img
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(ext: str, data: Buffer, channels: int, max_pixels: int) -> np.ndarray:
    """uint8 [H, W, channels] RGB (or gray) at full scale, after the resource checks."""
    return decode_pixels(check_image(ext, data, max_pixels), channels)


def reduced_box(box: tuple[int, int, int, int], factor: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A full-image box (top, left, height, width) in an image decoded at 1/factor of shape [H', W', ...].

    Each edge goes to the nearest edge of the reduced grid (pixel i of it covers full pixels
    [i·f, (i+1)·f)), rounding half up so that a side of s ≥ n·f full pixels keeps ≥ n reduced pixels,
    then is clamped inside the reduced image.
    """
    if factor == 1:
        return box
    top, left, ch, cw = box

    def edge(x: int, n: int) -> int:
        return min(n, (2 * x + factor) // (2 * factor))  # floor(x / f + 1/2), in integers

    t, b, lo, r = edge(top, shape[0]), edge(top + ch, shape[0]), edge(left, shape[1]), edge(left + cw, shape[1])
    t, lo = min(t, shape[0] - 1), min(lo, shape[1] - 1)
    return t, lo, max(1, b - t), max(1, r - lo)
