"""Sources that `selfsup shards write` turns into shards.

A source lists lightweight, picklable items (a file path or an array index) and encodes one
item into tar members in a worker process. Sources are detected from the SOURCE path or named
with `--source-type`:

- `folder`: media files found recursively; label from the parent folder name or a regex
- `fashion-mnist`: the four IDX files (gzip or not) of Fashion-MNIST / MNIST; `--subset train|test`
- `fsdd`: Free Spoken Digit recordings `{digit}_{speaker}_{index}.wav`; label = digit
- `moving-fashion-mnist`: clips of one Fashion-MNIST item moving across a canvas (pipeline.moving)
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from selfsup.pipeline.registry import Registry
from selfsup.pipeline.tarindex import encode_label

EXTENSIONS = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp"),
    "audio": ("wav", "flac", "mp3", "ogg", "m4a", "opus"),
    "video": ("mp4", "avi", "mkv", "webm", "mov", "m4v"),
}
SOURCES: Registry[Any] = Registry("source type")


@dataclass(frozen=True)
class Item:
    """One sample to write: its key, what encode() needs, its label and extra metadata."""

    key: str
    ref: Any
    label: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    size_hint: int = 0


def sanitize_key(name: str) -> str:
    """A tar-safe sample key: no dots (they start the extension), no slashes, no spaces."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def modality_of_ext(ext: str) -> Optional[str]:
    """Which modality a file extension belongs to, if any."""
    ext = ext.lower().lstrip(".")
    return next((m for m, exts in EXTENSIONS.items() if ext in exts), None)


def with_label(members: dict[str, bytes], item: Item, label_names: Sequence[str]) -> dict[str, bytes]:
    """Add `.cls` and `.json` members for a labeled item."""
    extra = dict(item.extra)
    if item.label is not None:
        members["cls"] = encode_label(item.label)
        if label_names:
            extra["label_name"] = label_names[item.label]
    if extra:
        members["json"] = json.dumps(extra, sort_keys=True).encode("utf-8")
    return members


def apply_filters(items: list[Item], include: Optional[str], exclude: Optional[str],
                  name: Any = lambda it: it.key) -> list[Item]:
    """Keep items whose name matches `include` and not `exclude` (regexes, searched)."""
    if include:
        inc = re.compile(include)
        items = [it for it in items if inc.search(name(it))]
    if exclude:
        exc = re.compile(exclude)
        items = [it for it in items if not exc.search(name(it))]
    return items


# ---------------------------------------------------------------- folder of media files

@SOURCES.register("folder")
@dataclass(frozen=True)
class FolderSource:
    """Media files under a folder (recursive), for one modality."""

    root: str
    modality: str
    labels: str = "none"  # none | folder | a regex whose first group is the label

    @staticmethod
    def detect(root: str) -> bool:
        """Any folder can be a folder source."""
        return os.path.isdir(root)

    def scan(self) -> tuple[list[str], dict[str, int]]:
        """Relative paths of the modality's files, and counts of other media found."""
        wanted = EXTENSIONS[self.modality]
        found, others = [], {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            for fn in sorted(filenames):
                ext = fn.rsplit(".", 1)[-1].lower() if "." in fn else ""
                rel = os.path.relpath(os.path.join(dirpath, fn), self.root)
                if ext in wanted:
                    found.append(rel)
                elif modality_of_ext(ext):
                    others[ext] = others.get(ext, 0) + 1
        return found, others

    def items(self) -> tuple[list[Item], list[str]]:
        """Items and the label names (index = class id)."""
        files, others = self.scan()
        if not files:
            hint = ""
            if others:
                kinds = sorted({modality_of_ext(e) for e in others} - {None})
                hint = (f" (found {', '.join(f'{n} .{e}' for e, n in sorted(others.items()))} files: "
                        f"did you mean --modality {kinds[0]}?)")
            raise ValueError(f"{self.root} has no {self.modality} files "
                             f"({'/'.join(EXTENSIONS[self.modality])}){hint}")
        names = [self._label_name(rel) for rel in files]
        label_names = sorted({n for n in names if n is not None})
        ids = {n: i for i, n in enumerate(label_names)}
        items = []
        for rel, name in zip(files, names):
            key = sanitize_key(os.path.splitext(rel)[0])
            size = os.path.getsize(os.path.join(self.root, rel))
            items.append(Item(key, rel, ids.get(name) if name is not None else None,
                              {"path": rel}, size))
        return items, label_names

    def _label_name(self, rel: str) -> Optional[str]:
        if self.labels == "none":
            return None
        if self.labels == "folder":
            parent = os.path.basename(os.path.dirname(rel))
            return parent or None
        m = re.search(self.labels, rel)
        if not m:
            raise ValueError(f"label pattern {self.labels!r} does not match {rel}")
        return m.group(1) if m.groups() else m.group(0)

    def encode(self, item: Item) -> dict[str, bytes]:
        """The file's bytes under its (normalized) extension."""
        ext = item.ref.rsplit(".", 1)[-1].lower()
        ext = {"jpeg": "jpg"}.get(ext, ext)
        with open(os.path.join(self.root, item.ref), "rb") as f:
            return {ext: f.read()}


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")


def _idx_path(root: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """An IDX array (uint8 images [N, 28, 28] or labels [N]); raises ValueError if malformed."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {body.size} (truncated?)")
    return body.reshape(dims)


def fmnist_arrays(root: str, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N]) of a Fashion-MNIST subset ('train' or 'test')."""
    if subset not in FMNIST_FILES:
        raise ValueError(f"--subset must be train or test for Fashion-MNIST, got {subset!r}")
    img_stem, lab_stem = FMNIST_FILES[subset]
    img, lab = _idx_path(root, img_stem), _idx_path(root, lab_stem)
    if img is None or lab is None:
        raise FileNotFoundError(f"{root} lacks {img_stem}(.gz) or {lab_stem}(.gz)")
    images, labels = read_idx(img), read_idx(lab)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels


@SOURCES.register("fashion-mnist")
@dataclass(frozen=True)
class FashionMNISTSource:
    """Fashion-MNIST IDX files; each image is encoded once as PNG."""

    root: str
    subset: str = "train"
    labels: str = "auto"

    @staticmethod
    def detect(root: str) -> bool:
        """A folder holding the IDX image files."""
        return any(_idx_path(root, s[0]) for s in FMNIST_FILES.values())

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per image of the subset."""
        _, labels = fmnist_arrays(self.root, self.subset)
        keep = self.labels != "none"
        return [Item(f"fmnist-{self.subset}-{i:05d}", i, int(labels[i]) if keep else None, {}, 300)
                for i in range(len(labels))], list(FMNIST_CLASSES) if keep else []

    def encode(self, item: Item) -> dict[str, bytes]:
        """The image as PNG."""
        import cv2

        images, _ = fmnist_arrays(self.root, self.subset)
        ok, png = cv2.imencode(".png", images[item.ref])
        if not ok:
            raise ValueError(f"PNG encoding failed for {item.key}")
        return {"png": png.tobytes()}


# ---------------------------------------------------------------- Free Spoken Digit Dataset

FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


@SOURCES.register("fsdd")
@dataclass(frozen=True)
class FSDDSource:
    """Free Spoken Digit recordings; label = digit, speaker and index kept in `.json`."""

    root: str
    labels: str = "auto"

    @staticmethod
    def detect(root: str) -> bool:
        """A folder whose WAV files are all named digit_speaker_index.wav."""
        if not os.path.isdir(root):
            return False
        wavs = [f for f in os.listdir(root) if f.endswith(".wav")]
        return bool(wavs) and all(FSDD_NAME.match(f) for f in wavs[:50])

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per recording, sorted by name."""
        keep = self.labels != "none"
        out = []
        for fn in sorted(os.listdir(self.root)):
            m = FSDD_NAME.match(fn)
            if not m:
                continue
            digit, speaker, index = int(m.group(1)), m.group(2), int(m.group(3))
            out.append(Item(fn[:-4], fn, digit if keep else None,
                            {"speaker": speaker, "index": index, "digit": digit},
                            os.path.getsize(os.path.join(self.root, fn))))
        return out, [str(d) for d in range(10)] if keep else []

    def encode(self, item: Item) -> dict[str, bytes]:
        """The WAV bytes as they are."""
        with open(os.path.join(self.root, item.ref), "rb") as f:
            return {"wav": f.read()}


def detect_source(root: str, modality: str, source_type: Optional[str]) -> str:
    """The source type for SOURCE: the one named, else the first that recognizes the path."""
    if source_type:
        SOURCES.get(source_type)
        return source_type
    if FashionMNISTSource.detect(root):
        if modality == "video":
            return "moving-fashion-mnist"
        return "fashion-mnist"
    if FSDDSource.detect(root):
        return "fsdd"
    return "folder"


from selfsup.pipeline import moving  # noqa: E402,F401  (registers "moving-fashion-mnist")
