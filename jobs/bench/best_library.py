"""The `best_library` variant of `selfsup bench pipeline`: the image recipe in albumentations, on one core.

Issue 22 asks the kernel to beat the best CPU library for the same work. That library is
albumentations (on OpenCV), used the way its users write it: the sample bytes decoded at full scale
with cv2.imdecode (BGR → RGB), then one Compose per view with the modality's own recipe
parameters (RandomResizedCrop at `size` with an area filter when shrinking, flip, colour jitter,
grayscale, Gaussian blur with the modality's kernel, solarize where the recipe has it). Like
`kernel`, it runs in a plain loop in this process with the bytes read before the clock starts, so
vs_best_library = kernel / best_library samples per CPU-second is a per-core comparison.

albumentations is a bench-only extra (`pip install -c constraints.txt -e '.[bench]'`): without it
the variant prints one line saying so and is skipped. Pillow-SIMD (12.1.1.post0, source only) does
build and install on this machine (gcc, libjpeg and zlib headers), but it replaces Pillow itself, so it
is not a variant here.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from selfsup.pipeline.media import EXTENSIONS
from selfsup.pipeline.modalities.base import media_member
from selfsup.pipeline.modalities.image import ImageModality, blur_kernel

INSTALL = "pip install -c constraints.txt -e '.[bench]'"


def available() -> bool:
    """Whether albumentations can be imported here."""
    return importlib.util.find_spec("albumentations") is not None


def skip_line(modality: str) -> Optional[str]:
    """Why `best_library` cannot run for `modality` here (None: it can)."""
    if modality != "image":
        return f"best_library: images only (no {modality} library variant); skipped"
    if not available():
        return f"best_library: albumentations is not installed ({INSTALL}); skipped"
    return None


class ImageAlbumentations:
    """Image bytes → {view1, view2} uint8 [size, size, 3] with albumentations, the modality's recipe per view."""

    def __init__(self, args: Mapping[str, Any], seed: int = 0) -> None:
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
        import albumentations as A
        import cv2

        m = ImageModality(**args)
        if m.channels != 3 or m.recipe == "single":
            raise ValueError(f"best_library makes the two-view RGB recipe; got channels={m.channels}, "
                             f"recipe={m.recipe!r}: use channels=3 and recipe simclr or byol")
        kernel = blur_kernel(m.size)  # the modality's
        b, c, s, h = m.jitter
        self.views: list[Callable[..., Any]] = []
        for i, (blur_p, solarize_p) in enumerate(m.view_probs):
            ops = [A.RandomResizedCrop(size=(m.size, m.size), scale=m.scale, interpolation=cv2.INTER_LINEAR,
                                       area_for_downscale="image"),
                   A.HorizontalFlip(p=0.5 if m.flip else 0.0),
                   A.ColorJitter(brightness=(1 - b, 1 + b), contrast=(1 - c, 1 + c), saturation=(1 - s, 1 + s),
                                 hue=(-h, h), p=m.jitter_p),
                   A.ToGray(num_output_channels=3, p=m.gray_p)]
            if m.blur and blur_p:
                ops.append(A.GaussianBlur(blur_limit=(kernel, kernel), sigma_limit=(0.1, 2.0), p=blur_p))
            if solarize_p:
                ops.append(A.Solarize(threshold_range=(0.5, 0.5), p=solarize_p))
            self.views.append(A.Compose(ops, seed=seed + i))

    def __call__(self, data: bytes) -> dict[str, np.ndarray]:
        """Decode at full scale, then one view per Compose."""
        import cv2

        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError("OpenCV could not decode this image")
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return {f"view{i + 1}": view(image=img)["image"] for i, view in enumerate(self.views)}


def best_library_runner(spec: Any, wanted: bool, log: Callable[[str], None]
                        ) -> Optional[Callable[[Any], tuple[int, dict[str, float]]]]:
    """`run_best_library` for this spec, or None (saying why, when `wanted`) where it cannot run."""
    why = skip_line(spec.snapshot.modality)
    if why:
        if wanted:
            log(why)
        return None
    return lambda clock: run_best_library(spec, clock)


def run_best_library(spec: Any, clock: Any) -> tuple[int, dict[str, float]]:
    """The albumentations recipe over every sample in this process; bytes are read before the clock starts."""
    from selfsup.jobs.bench.pipeline import read_rows

    transform = ImageAlbumentations(spec.modality_args, spec.seed)
    data = [media_member(members, EXTENSIONS["image"], "image")[1] for _, _, members in read_rows(spec)[1]]
    clock.start()
    for d in data:
        transform(d)
    clock.stop()
    return len(data), {}
