"""`folder`: media files of one modality found recursively; label from the parent folder or a regex."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar, Optional

from selfsup.pipeline.media import extensions_of, modality_of_ext
from selfsup.pipeline.sources.base import (DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, SourceOptions, file_fingerprint,
                                           read_file, sanitize_key)

NORMALIZED_EXT = {"jpeg": "jpg"}  # member extension written for a file extension


@SOURCES.register("folder")
@dataclass(frozen=True)
class FolderSource:
    """Media files under a folder (recursive), for one modality."""

    root: str
    modality: str
    labels: str = "none"  # none | folder | a regex whose first group is the label

    natural_modality: ClassVar[Optional[str]] = None  # any: the files decide

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> FolderSource:
        """Labels 'auto' means the parent folder's name."""
        return cls(root, options.modality, "folder" if options.labels == "auto" else options.labels)

    @staticmethod
    def detect(root: str) -> bool:
        """Any folder can be a folder source."""
        return os.path.isdir(root)

    def scan(self) -> tuple[list[str], dict[str, int]]:
        """Relative paths of the modality's files, and counts of other media found."""
        wanted = extensions_of(self.modality)
        found: list[str] = []
        others: dict[str, int] = {}
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
                kinds = sorted({m for m in map(modality_of_ext, others) if m is not None})
                hint = (f" (found {', '.join(f'{n} .{e}' for e, n in sorted(others.items()))} files: "
                        f"did you mean --modality {kinds[0]}?)")
            raise ValueError(f"{self.root} has no {self.modality} files "
                             f"({'/'.join(extensions_of(self.modality))}){hint}")
        names = [self._label_name(rel) for rel in files]
        label_names = sorted({n for n in names if n is not None})
        ids = {n: i for i, n in enumerate(label_names)}
        items = []
        for rel, name in zip(files, names):
            key = sanitize_key(os.path.splitext(rel)[0])
            size, fingerprint = file_fingerprint(os.path.join(self.root, rel))
            items.append(Item(key, rel, ids.get(name) if name is not None else None,
                              {"path": rel}, size, fingerprint))
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

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The file's bytes under its (normalized) extension."""
        ext = item.ref.rsplit(".", 1)[-1].lower()
        ext = NORMALIZED_EXT.get(ext, ext)
        return {ext: read_file(os.path.join(self.root, item.ref), max_bytes)}
