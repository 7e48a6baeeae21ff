"""Images: decode JPEG/PNG/WebP with OpenCV, make SimCLR/BYOL views with OpenCV and LUTs.

Per CPU-second, OpenCV-based decode + two views at 224 px made 301 samples against 47 for
torchvision.transforms.v2 on uint8 tensors (`selfsup bench pipeline --modality image`), so every op here
works on uint8 HxWxC numpy arrays. Views are uint8 [size, size, channels].

Multi-crop (SwAV, Caron et al. 2020): `local_crops=K` adds a field `local` uint8
[K, local_size, local_size, channels] beside the two global views: K smaller crops (box area in
`local_scale` of the image) with view 1's photometric recipe, drawn from the sample's rng after the
global views, so view1/view2 are the same bytes with or without them. K=0 (the default) adds nothing.
"""
from __future__ import annotations

import io
import math
from typing import Any, Mapping

import cv2
import numpy as np
from PIL import Image

from selfsup.pipeline.media import EXTENSIONS
from selfsup.pipeline.modalities import MODALITIES
from selfsup.pipeline.modalities.base import DecodeError, Sample, float_pair, media_member

cv2.setNumThreads(1)
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit from the header, before decoding

RECIPES = ("simclr", "byol", "single")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; DecodeError if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for junk
        raise DecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None


def check_complete(ext: str, data: bytes) -> None:
    """Raise DecodeError for truncated files that decoders would return partially."""
    tail = data[-1024:].rstrip(b"\x00\r\n\t ")
    if ext in ("jpg", "jpeg") and not tail.endswith(b"\xff\xd9"):
        raise DecodeError("truncated JPEG (no end-of-image marker)")
    if ext == "png" and b"IEND" not in data[-64:]:
        raise DecodeError("truncated PNG (no IEND chunk)")
    if ext == "webp" and (len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)):
        raise DecodeError("truncated WebP (RIFF size exceeds the data)")


def decode_image(ext: str, data: bytes, channels: int, max_pixels: int, min_side: int = 0) -> np.ndarray:
    """uint8 [H, W, channels] RGB (or gray); JPEGs decode at a reduced scale when larger than needed."""
    w, h = image_size(data)
    if w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    check_complete(ext, data)
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    if ext in ("jpg", "jpeg") and min_side:
        for factor, reduced in ((8, 64), (4, 32), (2, 16)):  # IMREAD_REDUCED_{GRAYSCALE,COLOR}_N
            if min(w, h) // factor >= min_side:
                flag = reduced + (0 if channels == 1 else 1)
                break
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None:
        raise DecodeError(f"OpenCV could not decode this .{ext}")
    if channels == 1:
        return img[:, :, None] if img.ndim == 2 else img
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ---------------------------------------------------------------- geometric ops

def crop_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), as torchvision samples it."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size (area filter when shrinking a lot, bilinear otherwise)."""
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) > 2 * size else cv2.INTER_LINEAR
    out = cv2.resize(img, (size, size), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def center_view(img: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """Eval view: resize the shorter side to size/crop_fraction, then center-crop size×size."""
    h, w = img.shape[:2]
    short = max(size, int(round(size / crop_fraction)))
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if min(h, w) > short else cv2.INTER_LINEAR
        img = cv2.resize(img, (nw, nh), interpolation=interp)
        img = img[:, :, None] if img.ndim == 2 else img
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top: top + size, left: left + size]


# ---------------------------------------------------------------- photometric ops (uint8)

def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    out = cv2.LUT(img, np.clip(table, 0, 255).astype(np.uint8))
    return out[:, :, None] if out.ndim == 2 else out


def _gray(img: np.ndarray) -> np.ndarray:
    return img[:, :, 0] if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def color_jitter(img: np.ndarray, rng: np.random.Generator, b: float, c: float, s: float, h: float) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter in a random order (torchvision's semantics)."""
    ramp = np.arange(256, dtype=np.float32)
    for op in rng.permutation(4):
        if op == 0 and b > 0:
            img = _lut(img, ramp * rng.uniform(1 - b, 1 + b))
        elif op == 1 and c > 0:
            f, mean = rng.uniform(1 - c, 1 + c), float(_gray(img).mean())
            img = _lut(img, (ramp - mean) * f + mean)
        elif op == 2 and s > 0 and img.shape[2] == 3:
            f = rng.uniform(1 - s, 1 + s)
            gray = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
            img = cv2.addWeighted(img, f, gray, 1 - f, 0)
        elif op == 3 and h > 0 and img.shape[2] == 3:
            shift = int(round(rng.uniform(-h, h) * 180))
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 180).astype(np.uint8)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return img


def grayscale(img: np.ndarray) -> np.ndarray:
    """Gray with the same number of channels."""
    if img.shape[2] == 1:
        return img
    return cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float]) -> np.ndarray:
    """Blur with a kernel of about 10% of the image side and a random sigma."""
    k = max(3, int(0.1 * img.shape[0]) | 1)
    out = cv2.GaussianBlur(img, (k, k), rng.uniform(*sigma))
    return out[:, :, None] if out.ndim == 2 else out


def solarize(img: np.ndarray, threshold: int = 128) -> np.ndarray:
    """Invert pixels at or above the threshold."""
    ramp = np.arange(256)
    return _lut(img, np.where(ramp >= threshold, 255 - ramp, ramp))


def check_local_crops(k: int, size: int, scale: tuple[float, float], recipe: str) -> None:
    """ValueError naming the multi-crop argument that cannot work (count, size, scale, or a one-view recipe)."""
    if k < 0:
        raise ValueError(f"image local_crops={k}; give 0 (no local crops) or a positive count")
    if size < 1:
        raise ValueError(f"image local_size={size}; give the local crops' side in pixels (SwAV: 96 at 224)")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"image local_scale={scale}; give (low, high) with 0 < low <= high <= 1 (SwAV: 0.05, 0.14)")
    if k and recipe == "single":
        raise ValueError("image local_crops needs a two-view recipe (simclr or byol), not recipe='single'")


@MODALITIES.register("image")
class ImageModality:
    """JPEG/PNG/WebP images → SimCLR/BYOL two views, one augmented view (MAE), or an eval view."""

    name = "image"
    extensions = EXTENSIONS["image"]

    def __init__(self, size: int = 224, channels: int = 3, recipe: str = "simclr",
                 scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
                 jitter_p: float = 0.8, gray_p: float = 0.2, blur: bool = True,
                 eval_crop: float = 0.875, max_pixels: int = 64_000_000, local_crops: int = 0,
                 local_size: int = 96, local_scale: tuple[float, float] = (0.05, 0.14)) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"image recipe {recipe!r} unknown; valid: {', '.join(RECIPES)}")
        self.local_crops, self.local_size = int(local_crops), int(local_size)
        self.local_scale = float_pair(local_scale, "image local_scale")
        check_local_crops(self.local_crops, self.local_size, self.local_scale, recipe)
        if channels not in (1, 3):
            raise ValueError(f"image channels must be 1 or 3, got {channels}")
        self.size, self.channels, self.recipe = int(size), int(channels), recipe
        self.scale, self.flip, self.jitter = float_pair(scale, "image scale"), flip, tuple(jitter)
        self.jitter_p, self.gray_p, self.blur = jitter_p, gray_p, blur
        self.eval_crop, self.max_pixels = eval_crop, int(max_pixels)
        # (blur p, solarize p) per view: SimCLR symmetric; BYOL asymmetric
        self.view_probs = {"simclr": ((0.5, 0.0), (0.5, 0.0)), "byol": ((1.0, 0.0), (0.1, 0.2)),
                           "single": ((0.0, 0.0),)}[recipe]

    def decode(self, members: Mapping[str, bytes]) -> np.ndarray:
        """uint8 [H, W, C]."""
        ext, data = media_member(members, self.extensions, self.name)
        return decode_image(ext, data, self.channels, self.max_pixels, min_side=self.size)

    def view(self, img: np.ndarray, rng: np.random.Generator, blur_p: float, solarize_p: float,
             local: bool = False) -> np.ndarray:
        """One augmented view uint8 [size, size, C] (a local crop [local_size, local_size, C] when `local`)."""
        scale, size = (self.local_scale, self.local_size) if local else (self.scale, self.size)
        top, left, ch, cw = crop_box(rng, img.shape[0], img.shape[1], scale)
        out = resize(img[top: top + ch, left: left + cw], size)
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        if self.recipe == "single":
            return np.ascontiguousarray(out)
        if rng.random() < self.jitter_p:
            out = color_jitter(np.ascontiguousarray(out), rng, *self.jitter)
        if rng.random() < self.gray_p:
            out = grayscale(out)
        if self.blur and rng.random() < blur_p:
            out = gaussian_blur(np.ascontiguousarray(out), rng, (0.1, 2.0))
        if rng.random() < solarize_p:
            out = solarize(out)
        return np.ascontiguousarray(out)

    def sample(self, decoded: Any, rng: np.random.Generator, train: bool) -> Sample:
        """Two views (simclr/byol) and the local crops if asked, one view (single), or the eval view."""
        if not train:
            return {"image": np.ascontiguousarray(center_view(decoded, self.size, self.eval_crop))}
        views = [self.view(decoded, rng, b, s) for b, s in self.view_probs]
        if len(views) == 1:
            return {"image": views[0]}
        out = {"view1": views[0], "view2": views[1]}
        if self.local_crops:  # after the global views: those keep their bytes
            blur_p, solarize_p = self.view_probs[0]
            out["local"] = np.stack([self.view(decoded, rng, blur_p, solarize_p, local=True)
                                     for _ in range(self.local_crops)])  # [K, S, S, C]
        return out

    def blank(self, train: bool) -> Sample:
        """Zero arrays shaped like `sample`'s."""
        z = np.zeros((self.size, self.size, self.channels), np.uint8)
        if not train or self.recipe == "single":
            return {"image": z}
        out = {"view1": z, "view2": z.copy()}
        if self.local_crops:
            out["local"] = np.zeros((self.local_crops, self.local_size, self.local_size, self.channels), np.uint8)
        return out

    def token_grid(self, geometry: Mapping[str, Any]) -> tuple[int, ...]:
        """(H/p, W/p) patches."""
        from selfsup.pipeline.masking import grid_from_geometry

        return grid_from_geometry((self.size, self.size, self.channels), geometry, "image")

    def valid_tokens(self, sample: Sample, geometry: Mapping[str, Any]) -> int:
        """Every patch is real."""
        return int(np.prod(self.token_grid(geometry)))
