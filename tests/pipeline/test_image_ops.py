"""The image ops' fast forms against the forms they replaced, on real photos (tests/conftest PHOTOS).

Blur (kernel cut at 4 sigma), hue (one 3-channel LUT), flip (cv2.flip) and gray views kept one channel
until the end make the same bytes as before; the references below are the replaced code, verbatim.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from selfsup.pipeline.modalities import image as I
from selfsup.pipeline.modalities import make_modality
from tests.conftest import PHOTOS

PHOTO_FILES = sorted(PHOTOS.glob("*.jpg"))[::60]  # 5 photos


def photo(i: int) -> np.ndarray:
    return I.decode_image("jpg", PHOTO_FILES[i].read_bytes(), 3, 10**9)


def photo_views(n: int = 2) -> list[np.ndarray]:
    """224×224 crops of each photo, resized as views are."""
    out = []
    for i in range(len(PHOTO_FILES)):
        img = photo(i)
        out += [I.resize(img[k * 100: k * 100 + 400, k * 150: k * 150 + 500], 224) for k in range(n)]
    return out


def old_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    k = max(3, int(0.1 * img.shape[0]) | 1)
    out = cv2.GaussianBlur(img, (k, k), sigma)
    return out[:, :, None] if out.ndim == 2 else out


def old_hue(img: np.ndarray, h: float) -> np.ndarray:
    shift = int(round(h * 180))
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def old_photometric(out: np.ndarray, plan: I.ViewPlan) -> np.ndarray:
    """`render` after the resize, as it was: numpy flip, HSV hue round trip, 3-channel gray, 10%-side blur."""
    if plan.flip:
        out = out[:, ::-1]
    if plan.jitter is not None:
        out = np.ascontiguousarray(out)
        for op, f in plan.jitter:
            out = old_hue(out, f) if op == 3 else I.JITTER_OPS[op](out, f)
    if plan.gray:
        out = I.grayscale(out)
    if plan.sigma is not None:
        out = old_blur(np.ascontiguousarray(out), plan.sigma)
    if plan.solarize:
        out = I.solarize(out)
    return np.ascontiguousarray(out)


def test_blur_cut_at_4_sigma_is_byte_for_byte_the_10_percent_kernel() -> None:
    """The recipe's sigma range, on photo views and on noise (the worst case for a cut kernel) at several sides."""
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (s, s, c), dtype=np.uint8) for s in (16, 64, 96, 160, 224) for c in (1, 3)]
    for img in photo_views(1) + noise:
        for sigma in np.linspace(0.1, 2.0, 20):
            assert np.array_equal(I.blur(img, float(sigma)), old_blur(img, float(sigma))), (img.shape, sigma)
    assert I.blur_taps(224, 0.1) == 3 and I.blur_taps(224, 1.0) == 9 and I.blur_taps(224, 2.0) == 17
    assert I.blur_taps(224, 3.0) == 23 and I.blur_taps(16, 2.0) == 3  # never more than 10% of the side


def test_hue_lut_is_byte_for_byte_the_hsv_round_trip() -> None:
    for img in photo_views(1):
        for h in np.linspace(-0.1, 0.1, 21):
            assert np.array_equal(I._hue(img, float(h)), old_hue(img, float(h))), h


@pytest.mark.parametrize("recipe", ["simclr", "byol"])
def test_views_are_byte_for_byte_the_old_photometric_path(recipe: str) -> None:
    """Every draw (flip, jitter order, gray, blur, solarize) on real photos: render == the old ops after the resize."""
    m = make_modality("image", size=224, recipe=recipe)
    seen = set()
    for i in range(len(PHOTO_FILES)):
        img = photo(i)
        for seed in range(6):
            for plan in m.plans(np.random.default_rng(seed), *img.shape):
                top, left, ch, cw = plan.box
                resized = I.resize(img[top: top + ch, left: left + cw], plan.size)
                plain = dataclasses.replace(plan, flip=False, jitter=None, gray=False, sigma=None, solarize=False)
                assert np.array_equal(I.render(img, plain), resized)
                assert np.array_equal(I.render(img, plan), old_photometric(resized, plan))
                seen |= {k for k in ("flip", "gray", "solarize") if getattr(plan, k)}
                seen |= {"blur"} if plan.sigma is not None else set()
                seen |= {"hue"} if plan.jitter and any(op == 3 for op, _ in plan.jitter) else set()
    assert seen >= {"flip", "gray", "blur", "hue"} | ({"solarize"} if recipe == "byol" else set())


def old_resize(img: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if min(img.shape[:2]) > 2 * size else cv2.INTER_LINEAR
    out = cv2.resize(img, (size, size), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def test_resize_by_2x_halvings_differs_from_one_area_resize_by_resampling_error_only() -> None:
    """RandomResizedCrop boxes of the recipe on real photos: boxes up to 2× the side keep their bytes (bilinear,
    as before); larger ones (halved, then bilinear, instead of one INTER_AREA) differ by resampling error.

    Measured here (pinned OpenCV, 768×576 photos, 224 px): 2.2 grey levels mean MAD per view (max 3.5),
    per-channel means within 0.05 and stds within 0.3 of a level (stds are 50-70). For scale: the reduced
    decode (test_image_decode.py) differs from the full one by 2.0, and moving a box by one pixel makes 6.5.
    """
    m = make_modality("image", size=224, recipe="single")
    mads, new, old = [], [], []
    for i in range(len(PHOTO_FILES)):
        img = photo(i)
        for seed in range(12):
            top, left, ch, cw = m.plans(np.random.default_rng(seed), *img.shape)[0].box
            crop = img[top: top + ch, left: left + cw]
            a, b = I.resize(crop, 224), old_resize(crop, 224)
            if min(ch, cw) <= 448:
                assert np.array_equal(a, b)
                continue
            mads.append(float(np.abs(a.astype(np.int16) - b).mean()))
            new.append(a.reshape(-1, 3).astype(np.float64))
            old.append(b.reshape(-1, 3).astype(np.float64))
    assert len(mads) >= 20 and np.mean(mads) < 3.0 and max(mads) < 5.0, (np.mean(mads), max(mads))
    assert np.abs(np.concatenate(new).mean(0) - np.concatenate(old).mean(0)).max() < 0.5
    assert np.abs(np.concatenate(new).std(0) - np.concatenate(old).std(0)).max() < 1.0  # no contrast lost
    gray = photo(0)[:, :, :1]
    assert I.resize(gray, 100).shape == (100, 100, 1) and I.resize(gray, 16).shape == (16, 16, 1)  # several halvings
