"""Images: decode JPEG/PNG/WebP with OpenCV, make SimCLR/BYOL views with OpenCV and LUTs.

Per CPU-second, OpenCV-based decode + two views at 224 px made 301 samples against 47 for
torchvision.transforms.v2 on uint8 tensors (`selfsup bench pipeline --modality image`), so every op here
works on uint8 HxWxC numpy arrays. Views are uint8 [size, size, channels].

Decode once, at the scale the crops need: `decode` only checks the bytes (image_decode.py) and
keeps them encoded; `sample` first makes every random draw of the sample (`plans`: each view's
RandomResizedCrop box in full-image pixels from the header's size, flip, jitter, gray, blur,
solarize, in the same rng order as drawing them view by view), then decodes a JPEG once at the
largest DCT scale-down f in 8, 4, 2 such that every box's shorter side / f >= the side it is
resized to (`dct_factor`), and cuts each box from the reduced image (`reduced_box`). So no box is
upsampled from a reduced decode where the full decode would have shrunk it, a seed means the same
boxes and photometric draws as with a full decode, and the views differ from the full decode's
by resampling error only (tests/pipeline/test_image_decode.py measures it). PNG/WebP decode at
full scale, byte for byte as before. The eval view decodes at the largest f that keeps the
shorter side >= its resize target (size / eval_crop).

Multi-crop (SwAV, Caron et al. 2020): `local_crops=K` adds a field `local` uint8
[K, local_size, local_size, channels] beside the two global views: K smaller crops (box area in
`local_scale` of the image) with view 1's photometric recipe, drawn from the sample's rng after the
global views, so view1/view2 are the same bytes with or without them. K=0 (the default) adds nothing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from selfsup.pipeline.media import EXTENSIONS
from selfsup.pipeline.modalities import MODALITIES
from selfsup.pipeline.modalities.base import Sample, float_pair, media_member
from selfsup.pipeline.modalities.image_decode import (  # noqa: F401 (decode_image: API)
    EncodedImage, check_image, dct_factor, decode_image, decode_pixels, reduced_box)

cv2.setNumThreads(1)

RECIPES = ("simclr", "byol", "single")


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
    """Resize to size×size: exact 2× area halvings while the shorter side is over 2·size, then bilinear.

    A halving averages 2×2 blocks (OpenCV INTER_AREA at exactly 1/2, its integer fast path; an odd last
    row or column is dropped), as a JPEG decoded at 1/2 by its DCT would, so a crop of a reduced decode
    meets the same filters as the full decode's crop. A direct INTER_AREA at a ratio in (2, 2.6) cost
    ~5x the time; the views differ from it by resampling error (tests/pipeline/test_image_ops.py).
    """
    while min(img.shape[:2]) > 2 * size:
        h, w = img.shape[:2]
        img = cv2.resize(img[: h - h % 2, : w - w % 2], (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        img = img[:, :, None] if img.ndim == 2 else img
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirrored left-right, contiguous (cv2.flip: a numpy [:, ::-1] copy costs ~40x more)."""
    out = cv2.flip(img, 1)
    return out[:, :, None] if out.ndim == 2 else out


def eval_short_side(size: int, crop_fraction: float) -> int:
    """The shorter side the eval view resizes an image to before its centre crop."""
    return max(size, int(round(size / crop_fraction)))


def center_view(img: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """Eval view: resize the shorter side to size/crop_fraction, then center-crop size×size."""
    h, w = img.shape[:2]
    short = eval_short_side(size, crop_fraction)
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


def _brightness(img: np.ndarray, f: float) -> np.ndarray:
    return _lut(img, np.arange(256, dtype=np.float32) * f)


def _contrast(img: np.ndarray, f: float) -> np.ndarray:
    mean = float(_gray(img).mean())
    return _lut(img, (np.arange(256, dtype=np.float32) - mean) * f + mean)


def _saturation(img: np.ndarray, f: float) -> np.ndarray:
    gray = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, f, gray, 1 - f, 0)


@functools.lru_cache(maxsize=None)
def _hue_table(shift: int) -> np.ndarray:
    """uint8 [256, 1, 3]: H (OpenCV's 0..179) + shift mod 180 on channel 0, S and V unchanged."""
    ramp = np.arange(256)
    table = np.repeat(ramp[:, None, None], 3, axis=2)
    table[:180, 0, 0] = (ramp[:180] + shift) % 180
    return table.astype(np.uint8)


def _hue(img: np.ndarray, h: float) -> np.ndarray:
    """Hue rotated by h turns: H + round(180 h) mod 180 in OpenCV's 8-bit HSV, the shift as one 3-channel LUT."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    return cv2.cvtColor(cv2.LUT(hsv, _hue_table(int(round(h * 180)))), cv2.COLOR_HSV2RGB)


JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # indexed by the op number jitter_draws gives


def jitter_draws(rng: np.random.Generator, b: float, c: float, s: float, h: float,
                 channels: int) -> tuple[tuple[int, float], ...]:
    """(op, factor) pairs in the order to apply: brightness, contrast, saturation, hue in a random order
    (torchvision's semantics), each drawn only where its strength is > 0 (saturation and hue: colour only)."""
    ranges = ((1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h))
    usable = (b > 0, c > 0, s > 0 and channels == 3, h > 0 and channels == 3)
    return tuple((int(op), float(rng.uniform(*ranges[op]))) for op in rng.permutation(4) if usable[op])


def apply_jitter(img: np.ndarray, draws: Sequence[tuple[int, float]]) -> np.ndarray:
    """The colour jitter `jitter_draws` chose, on uint8 [H, W, C]."""
    for op, f in draws:
        img = JITTER_OPS[op](img, f)
    return img


def grayscale(img: np.ndarray) -> np.ndarray:
    """Gray with the same number of channels."""
    if img.shape[2] == 1:
        return img
    return cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)


def blur_kernel(side: int) -> int:
    """The recipe's Gaussian kernel: about 10% of the image side, odd, at least 3 (SimCLR's); the bench's
    library variants use it too."""
    return max(3, int(0.1 * side) | 1)


def blur_taps(side: int, sigma: float) -> int:
    """The Gaussian's taps: `blur_kernel`, cut to radius ceil(4 sigma) where that is fewer.

    OpenCV blurs uint8 with fixed-point weights in which every tap beyond 4 sigma is 0, so the cut
    kernel gives the same bytes as the 10% one (tests/pipeline/test_image_ops.py checks), for less work.
    """
    return min(blur_kernel(side), max(3, 2 * math.ceil(4 * sigma) + 1))


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a kernel of about 10% of the image side (cut where its taps are 0: `blur_taps`)."""
    k = blur_taps(img.shape[0], sigma)
    out = cv2.GaussianBlur(img, (k, k), sigma)
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


@dataclass(frozen=True)
class ViewPlan:
    """One view's random draws, made before decoding (none of them depends on pixel values)."""

    box: tuple[int, int, int, int]  # (top, left, height, width) in full-image pixels
    size: int  # the side the box is resized to
    flip: bool = False
    jitter: Optional[tuple[tuple[int, float], ...]] = None  # jitter_draws; None: no jitter
    gray: bool = False
    sigma: Optional[float] = None  # blur sigma; None: no blur
    solarize: bool = False


def render(img: np.ndarray, plan: ViewPlan, factor: int = 1) -> np.ndarray:
    """The view `plan` draws, from pixels uint8 [H', W', C] decoded at 1/factor: uint8 [size, size, C]."""
    top, left, ch, cw = reduced_box(plan.box, factor, img.shape)
    out = resize(img[top: top + ch, left: left + cw], plan.size)
    channels = out.shape[2]
    if plan.flip:
        out = hflip(out)
    if plan.jitter is not None:
        out = apply_jitter(out, plan.jitter)
    if plan.gray:  # one channel until the end: the same bytes in each, a third of the blur and LUT work
        out = _gray(out)[:, :, None]
    if plan.sigma is not None:
        out = blur(out, plan.sigma)
    if plan.solarize:
        out = solarize(out)
    if out.shape[2] != channels:
        out = cv2.cvtColor(out[:, :, 0], cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(out)


@MODALITIES.register("image")
class ImageModality:
    """JPEG/PNG/WebP images → SimCLR/BYOL two views, one augmented view (MAE), or an eval view."""

    name = "image"
    extensions = EXTENSIONS["image"]
    member_views = True  # large photos arrive as views of the shard (OpenCV decodes them in place)

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

    def decode(self, members: Mapping[str, bytes]) -> EncodedImage:
        """The checked, still-encoded image (size from its header): `sample` decodes it at the scale it needs."""
        ext, data = media_member(members, self.extensions, self.name)
        return check_image(ext, data, self.max_pixels)

    def check(self, members: Mapping[str, bytes]) -> None:
        """`decode`, then the pixels too (a JPEG at 1/8: libjpeg still reads its whole entropy-coded stream),
        so that `shards write` refuses an image that would only fail in training."""
        encoded = self.decode(members)
        decode_pixels(encoded, 1, 8 if encoded.ext in ("jpg", "jpeg") else 1)

    def plan(self, rng: np.random.Generator, h: int, w: int, channels: int, blur_p: float, solarize_p: float,
             local: bool = False) -> ViewPlan:
        """One view's draws from `rng` for an h×w image (a local crop's when `local`); no pixel needed."""
        scale, size = (self.local_scale, self.local_size) if local else (self.scale, self.size)
        box = crop_box(rng, h, w, scale)
        flip = bool(self.flip and rng.random() < 0.5)
        if self.recipe == "single":
            return ViewPlan(box, size, flip)
        b, c, s, hue = self.jitter
        jitter = jitter_draws(rng, b, c, s, hue, channels) if rng.random() < self.jitter_p else None
        gray = bool(rng.random() < self.gray_p)
        sigma = float(rng.uniform(0.1, 2.0)) if self.blur and rng.random() < blur_p else None
        return ViewPlan(box, size, flip, jitter, gray, sigma, bool(rng.random() < solarize_p))

    def plans(self, rng: np.random.Generator, h: int, w: int, channels: int) -> list[ViewPlan]:
        """Every view's draws in the sample's order: the views, then the local crops (view 1's recipe)."""
        out = [self.plan(rng, h, w, channels, b, s) for b, s in self.view_probs]
        if len(out) > 1 and self.local_crops:  # after the global views: those keep their bytes
            out += [self.plan(rng, h, w, channels, *self.view_probs[0], local=True) for _ in range(self.local_crops)]
        return out

    def sample(self, decoded: Any, rng: np.random.Generator, train: bool) -> Sample:
        """Two views (simclr/byol) and the local crops if asked, one view (single), or the eval view.

        `decoded`: an EncodedImage (decoded here, once, at the largest DCT scale-down every box allows)
        or pixels uint8 [H, W, C] (used as they are).
        """
        if not train:
            return {"image": np.ascontiguousarray(center_view(self.eval_pixels(decoded), self.size, self.eval_crop))}
        if isinstance(decoded, EncodedImage):  # every draw first, then one decode at the scale they allow
            plans = self.plans(rng, decoded.height, decoded.width, self.channels)
            factor = dct_factor(decoded.ext, ((min(p.box[2:]), p.size) for p in plans))
            img = decode_pixels(decoded, self.channels, factor)
        else:
            plans, factor, img = self.plans(rng, *decoded.shape), 1, decoded
        views = [render(img, p, factor) for p in plans]
        if len(views) == 1:
            return {"image": views[0]}
        out = {"view1": views[0], "view2": views[1]}
        if self.local_crops:
            out["local"] = np.stack(views[2:])  # [K, S, S, C]
        return out

    def eval_pixels(self, decoded: Any) -> np.ndarray:
        """The eval view's pixels: a JPEG at the largest DCT scale-down whose shorter side still covers the resize."""
        if not isinstance(decoded, EncodedImage):
            return decoded
        factor = dct_factor(decoded.ext, [(min(decoded.height, decoded.width), eval_short_side(self.size, self.eval_crop))])
        return decode_pixels(decoded, self.channels, factor)

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
