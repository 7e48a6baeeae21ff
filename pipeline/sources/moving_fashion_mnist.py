"""`moving-fashion-mnist`: clips of one Fashion-MNIST item sliding across a black canvas.

Each clip shows one 28×28 item moving in a straight line for `frames` frames in one of eight
directions (0=E, 1=NE, 2=N, 3=NW, 4=W, 5=SW, 6=S, 7=SE: the unit vector (cos, sin) of k·45°
with image y pointing down, so N is -y) at 1–2 pixels per frame. Positions are rounded to
whole pixels per frame (no resampling: every frame holds the item's exact pixels, so its total
intensity is constant), and the start is drawn so the whole path stays inside the canvas (no
wrap, no bounce). Labels: `.cls` = item class, `.json` {"motion": direction, "speed", "start",
"item_index"}: a motion-direction probe reads `motion` (train it with flips off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np

from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.sources.base import DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, SourceOptions, array_fingerprint
from selfsup.pipeline.sources.fashion_mnist import FMNIST_CLASSES, fmnist_arrays, has_fmnist_images

DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
ITEM = 28  # side of a Fashion-MNIST image


def offsets(direction: int, speed: float, frames: int) -> np.ndarray:
    """int64 [frames, 2] (dx, dy) of the item's top-left corner from frame 0, rounded to pixels."""
    if not 0 <= direction < 8:
        raise ValueError(f"direction {direction} must be in 0..7 ({', '.join(DIRECTIONS)})")
    angle = direction * math.pi / 4
    step = np.array([math.cos(angle), -math.sin(angle)]) * speed  # image y points down
    return np.rint(np.arange(frames)[:, None] * step).astype(np.int64)


def start_range(direction: int, speed: float, frames: int, canvas: int, size: int = ITEM
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((x_lo, x_hi), (y_lo, y_hi)) inclusive: the starts that keep every frame's item box inside."""
    d = offsets(direction, speed, frames)  # [frames, 2]
    lo, hi = -d.min(axis=0), canvas - size - d.max(axis=0)
    if (hi < lo).any():
        raise ValueError(f"a {size}px item moving {DIRECTIONS[direction]} at {speed} px/frame for {frames} "
                         f"frames does not fit a {canvas}px canvas: use a larger canvas or fewer frames")
    return (int(lo[0]), int(hi[0])), (int(lo[1]), int(hi[1]))


def clip_params(rng: np.random.Generator, frames: int = 16, canvas: int = 64
                ) -> tuple[int, float, tuple[int, int]]:
    """(direction uniform in 0..7, speed uniform in [1, 2], start (x, y) uniform among those that fit)."""
    direction = int(rng.integers(0, 8))
    speed = float(rng.uniform(1.0, 2.0))
    (x_lo, x_hi), (y_lo, y_hi) = start_range(direction, speed, frames, canvas)
    return direction, speed, (int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1)))


def render_clip(item: np.ndarray, direction: int, speed: float, start: tuple[int, int], frames: int = 16,
                canvas: int = 64) -> np.ndarray:
    """uint8 [frames, canvas, canvas]: `item` [28, 28] pasted at start + rounded offsets on black."""
    h, w = item.shape
    out = np.zeros((frames, canvas, canvas), np.uint8)
    for t, (dx, dy) in enumerate(offsets(direction, speed, frames)):
        x, y = start[0] + int(dx), start[1] + int(dy)
        if x < 0 or y < 0 or x + w > canvas or y + h > canvas:
            raise ValueError(f"start {start} moving {DIRECTIONS[direction]} at {speed} px/frame leaves the "
                             f"{canvas}px canvas at frame {t}: draw starts with clip_params")
        out[t, y: y + h, x: x + w] = item
    return out


@SOURCES.register("moving-fashion-mnist")
@dataclass(frozen=True)
class MovingFashionMNISTSource:
    """Fashion-MNIST items moving across a canvas, one MP4 clip per image of the subset."""

    root: str
    subset: str = "train"
    labels: str = "auto"
    seed: int = 0
    frames: int = 16
    canvas: int = 64
    fps: int = 8

    natural_modality: ClassVar[Optional[str]] = "video"

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> MovingFashionMNISTSource:
        """Reads the subset, the labels setting and the seed (which draws every clip's motion)."""
        return cls(root, subset=options.subset, labels=options.labels, seed=options.seed)

    @staticmethod
    def detect(root: str) -> bool:
        """A folder holding Fashion-MNIST IDX image files."""
        return has_fmnist_images(root)

    def params(self, index: int) -> tuple[int, float, tuple[int, int]]:
        """The clip parameters of image `index`, a pure function of (seed, subset, index)."""
        return clip_params(rng_for("moving", self.seed, self.subset, index), self.frames, self.canvas)

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per image; labels 'none' drops both the class and the motion metadata."""
        images, labels = fmnist_arrays(self.root, self.subset)
        if self.labels == "none":
            return [Item(self.key(i), i, None, {}, 4000, array_fingerprint(images[i]))
                    for i in range(len(labels))], []
        items = []
        for i in range(len(labels)):
            direction, speed, start = self.params(i)
            extra: dict[str, Any] = {"motion": direction, "speed": speed, "start": list(start), "item_index": i}
            items.append(Item(self.key(i), i, int(labels[i]), extra, 4000,
                              array_fingerprint(images[i], int(labels[i]))))
        return items, list(FMNIST_CLASSES)

    def key(self, index: int) -> str:
        """The sample key of image `index`."""
        return f"mfmnist-{self.subset}-{index:05d}"

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The clip as a near-lossless MP4, gray replicated to 3 channels."""
        from selfsup.pipeline.modalities.video import encode_clip_mp4

        images, _ = fmnist_arrays(self.root, self.subset)
        direction, speed, start = self.params(int(item.ref))
        clip = render_clip(images[int(item.ref)], direction, speed, start, self.frames, self.canvas)
        return {"mp4": encode_clip_mp4(np.repeat(clip[..., None], 3, axis=3), self.fps)}
