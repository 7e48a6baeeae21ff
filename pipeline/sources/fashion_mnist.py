"""`fashion-mnist`: the four IDX files (gzip or not) of Fashion-MNIST or MNIST; each image one PNG."""
from __future__ import annotations

import functools
import gzip
import math
import os
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from selfsup.pipeline.sources.base import DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, SourceOptions, array_fingerprint

FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MAX_IDX_VALUES = 2**30  # values an IDX file may hold (Fashion-MNIST's largest holds 47 million)
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")


def idx_path(root: str, stem: str) -> Optional[str]:
    """The IDX file `stem` under `root`, gzipped or not, or None when neither exists."""
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """An IDX array (uint8 images [N, 28, 28] or labels [N]); raises ValueError if malformed or too large.

    The size comes from the header and is checked before the body is read (a small .gz may inflate to any size).
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 8:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        raw = f.read(4 * head[3])
        dims = [int.from_bytes(raw[4 * i: 4 * i + 4], "big") for i in range(len(raw) // 4)]
        count = math.prod(dims)
        if len(dims) != head[3]:
            raise ValueError(f"{path}: IDX header cut short (truncated?)")
        if count > MAX_IDX_VALUES:
            raise ValueError(f"{path}: IDX header gives dimensions {dims} = {count} values, over the limit of "
                             f"{MAX_IDX_VALUES}; is it an IDX file?")
        body = f.read(count + 1)  # one byte more: tells a longer file from an exact one
    if len(body) != count:
        raise ValueError(f"{path}: expected {count} values, found {'more' if len(body) > count else len(body)} "
                         "(truncated, or not an IDX file?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def fmnist_arrays(root: str, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N]) of a Fashion-MNIST subset ('train' or 'test')."""
    if subset not in FMNIST_FILES:
        raise ValueError(f"--subset must be train or test for Fashion-MNIST, got {subset!r}")
    img_stem, lab_stem = FMNIST_FILES[subset]
    img, lab = idx_path(root, img_stem), idx_path(root, lab_stem)
    if img is None or lab is None:
        raise FileNotFoundError(f"{root} lacks {img_stem}(.gz) or {lab_stem}(.gz)")
    images, labels = read_idx(img), read_idx(lab)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def has_fmnist_images(root: str) -> bool:
    """Whether `root` holds the IDX image file of either subset."""
    return any(idx_path(root, images) for images, _ in FMNIST_FILES.values())


@SOURCES.register("fashion-mnist")
@dataclass(frozen=True)
class FashionMNISTSource:
    """Fashion-MNIST IDX files; each image is encoded once as PNG."""

    root: str
    subset: str = "train"
    labels: str = "auto"

    natural_modality: ClassVar[Optional[str]] = "image"

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> FashionMNISTSource:
        """Reads the subset and the labels setting."""
        return cls(root, subset=options.subset, labels=options.labels)

    @staticmethod
    def detect(root: str) -> bool:
        """A folder holding the IDX image files."""
        return has_fmnist_images(root)

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per image of the subset."""
        images, labels = fmnist_arrays(self.root, self.subset)
        keep = self.labels != "none"
        return [Item(f"fmnist-{self.subset}-{i:05d}", i, int(labels[i]) if keep else None, {}, 300,
                     array_fingerprint(images[i], int(labels[i]) if keep else None))
                for i in range(len(labels))], list(FMNIST_CLASSES) if keep else []

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The image as PNG."""
        import cv2

        images, _ = fmnist_arrays(self.root, self.subset)
        ok, png = cv2.imencode(".png", images[item.ref])
        if not ok:
            raise ValueError(f"PNG encoding failed for {item.key}")
        return {"png": png.tobytes()}
