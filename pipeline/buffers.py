"""Large members without copies: shard bytes as read-only views, and a file over a view for decoders.

A batch maker whose modality sets `member_views = True` reads a segment holding a sample of
`MEMBER_VIEW_BYTES` or more with `storage.read_view` (a local shard's range is memory-mapped, so
a decoder that reads part of a member, as a video clip's seek does, faults in only that part) and
hands the modality each such member as a read-only memoryview of the range, not a copied slice.
Smaller members stay `bytes`. Decoders that want a file (PyAV, Pillow, soundfile) open a member with
`buffer_file`, which copies only the chunks they ask for; `io.BytesIO` of a view would copy it whole.
"""
from __future__ import annotations

import io
from typing import IO, Any, Union, cast

MEMBER_VIEW_BYTES = 1 << 20  # members this large (and samples spanning this much) are read as views
Buffer = Union[bytes, bytearray, memoryview]


class BufferFile(io.RawIOBase):
    """A read-only, seekable binary file over a bytes-like buffer: `read` copies the chunk asked for, no more."""

    def __init__(self, data: Buffer) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        pos = offset + (0, self._pos, len(self._view))[whence]
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        if end <= self._pos:
            return b""
        out = self._view[self._pos: end].tobytes()
        self._pos = end
        return out

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, b: Any) -> int:  # any writable buffer
        self._checkClosed()
        dst = memoryview(b).cast("B")
        n = max(0, min(len(dst), len(self._view) - self._pos))
        dst[:n] = self._view[self._pos: self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()


def buffer_file(data: Buffer) -> IO[bytes]:
    """A binary file reading `data`: io.BytesIO for bytes (which shares them), a BufferFile for any other buffer."""
    return io.BytesIO(data) if isinstance(data, bytes) else cast(IO[bytes], BufferFile(data))
