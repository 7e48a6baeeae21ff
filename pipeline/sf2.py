"""SoundFont 2 files (RIFF `sfbk`): a bounds-checked reader of what a note renderer needs.

Layout read (SoundFont 2.04 spec): `RIFF sfbk` { `LIST INFO` (ifil version, INAM name),
`LIST sdta` (`smpl`: 16-bit signed little-endian mono PCM of every sample, back to back),
`LIST pdta` (phdr pbag pmod pgen inst ibag imod igen shdr: fixed-size records, each chunk
ending with a terminal record) }. Presets hold zones (key/velocity ranges + generators + an
instrument); instruments hold zones (ranges + generators + a sample header). A first zone
without its terminal generator (instrument / sampleID) is the global zone: its generators are
defaults for the other zones. Modulators (pmod/imod), `sm24` and ROM samples are ignored.

Only the pdta chunk is read whole (it is small); sample data is read per note by offset, so a
135 MB font costs a few kilobytes per note. Nothing is executed; every size and index is checked
against its container and a malformed file raises ValueError naming the file and the chunk.
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

# generator operators used by the renderer (SoundFont 2.04, section 8.1.2)
START_OFFSET, END_OFFSET, LOOP_START_OFFSET, LOOP_END_OFFSET = 0, 1, 2, 3
START_COARSE, END_COARSE, LOOP_START_COARSE, LOOP_END_COARSE = 4, 12, 45, 50
INSTRUMENT, KEY_RANGE, VEL_RANGE, ATTENUATION = 41, 43, 44, 48
COARSE_TUNE, FINE_TUNE, SAMPLE_ID, SAMPLE_MODES, SCALE_TUNING, ROOT_KEY = 51, 52, 53, 54, 56, 58
RANGES = (KEY_RANGE, VEL_RANGE)  # amounts are (lo, hi) bytes, not a signed word
ROM_SAMPLE = 0x8000
MAX_META_BYTES = 64 * 2**20  # INFO or pdta larger than this is not a real font (GM fonts hold < 1 MB)

# pdta sub-chunk → (struct format of one record, record size)
RECORDS = {"phdr": ("<20sHHHIII", 38), "pbag": ("<HH", 4), "pmod": ("<HHhHH", 10), "pgen": ("<HH", 4),
           "inst": ("<20sH", 22), "ibag": ("<HH", 4), "imod": ("<HHhHH", 10), "igen": ("<HH", 4),
           "shdr": ("<20sIIIIIBbHH", 46)}


@dataclass(frozen=True)
class SampleHeader:
    """One sample: frame addresses into `smpl` (end and loop_end exclusive), rate and root key."""

    name: str
    start: int
    end: int
    loop_start: int
    loop_end: int
    rate: int
    root_key: int
    correction: int  # cents
    kind: int        # 1 mono, 2 right, 4 left, 8 linked; | 0x8000 ROM


@dataclass(frozen=True)
class Zone:
    """Generators of one zone with the global zone's defaults merged in (operator → amount)."""

    gens: dict[int, int]

    def range(self, oper: int) -> tuple[int, int]:
        """(lo, hi) inclusive of a key or velocity range generator; (0, 127) when absent."""
        amount = self.gens.get(oper)
        return (0, 127) if amount is None else (amount & 0xFF, (amount >> 8) & 0xFF)

    def covers(self, key: int, velocity: int) -> bool:
        """Whether the zone plays `key` at `velocity`."""
        (klo, khi), (vlo, vhi) = self.range(KEY_RANGE), self.range(VEL_RANGE)
        return klo <= key <= khi and vlo <= velocity <= vhi


@dataclass(frozen=True)
class Preset:
    """A preset (bank, program) and its zones, each naming an instrument by index."""

    name: str
    bank: int
    program: int
    zones: tuple[Zone, ...]


@dataclass(frozen=True)
class SoundFont:
    """A parsed font: presets, instruments (their zones), sample headers, where `smpl` lies in the file."""

    path: str
    name: str
    presets: tuple[Preset, ...]
    instruments: tuple[tuple[Zone, ...], ...]
    samples: tuple[SampleHeader, ...]
    smpl_offset: int  # byte offset of the first sample frame in the file
    smpl_frames: int


def malformed(path: str, chunk: str, why: str) -> ValueError:
    """The error for a bad file: names it, the chunk and what to do."""
    return ValueError(f"{path}: malformed SoundFont, chunk {chunk!r}: {why} (truncated, or not a SoundFont 2 file)")


def read_chunks(f: BinaryIO, path: str, start: int, end: int, parent: str) -> dict[str, tuple[int, int]]:
    """Chunk id (or `LIST:<type>`) → (body offset, body size) of the chunks in [start, end) of the file."""
    out: dict[str, tuple[int, int]] = {}
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        head = f.read(8)
        cid, size = head[:4].decode("latin-1"), int.from_bytes(head[4:8], "little")
        if pos + 8 + size > end:
            raise malformed(path, cid, f"says {size} bytes at byte {pos} but {parent} has {end - pos - 8} left")
        if cid == "LIST":
            if size < 4:
                raise malformed(path, cid, f"a LIST of {size} bytes at byte {pos} has no type")
            f.seek(pos + 8)
            cid = "LIST:" + f.read(4).decode("latin-1")
        out.setdefault(cid, (pos + 8, size))
        pos += 8 + size + (size & 1)
    return out


def read_records(path: str, pdta: bytes, chunks: dict[str, tuple[int, int]], base: int, name: str) -> list[tuple]:
    """The records of one pdta sub-chunk; at least the terminal record, a whole number of them."""
    if name not in chunks:
        raise malformed(path, name, "missing from pdta")
    offset, size = chunks[name]
    fmt, rec = RECORDS[name]
    if size < rec or size % rec:
        raise malformed(path, name, f"{size} bytes is not a positive multiple of its {rec}-byte records")
    return list(struct.iter_unpack(fmt, pdta[offset - base: offset - base + size]))


def gen_amount(oper: int, amount: int) -> int:
    """A generator's amount: the raw word for ranges, else signed 16-bit."""
    return amount if oper in RANGES or amount < 0x8000 else amount - 0x10000


def zones_of(path: str, chunk: str, bags: list[tuple], gens: list[tuple], first: int, last: int,
             terminal: int) -> tuple[Zone, ...]:
    """The zones of bags [first, last), the global zone's generators merged into each."""
    if not 0 <= first <= last < len(bags):
        raise malformed(path, chunk, f"zone indices {first}..{last} outside the {len(bags)} bag records")
    defaults: dict[int, int] = {}
    zones = []
    for b in range(first, last):
        g0, g1 = bags[b][0], bags[b + 1][0]
        if not 0 <= g0 <= g1 < len(gens):
            raise malformed(path, chunk, f"generator indices {g0}..{g1} outside the {len(gens)} generator records")
        own = {oper: gen_amount(oper, amount) for oper, amount in gens[g0:g1]}
        if terminal in own:
            zones.append(Zone({**defaults, **own}))
        elif b == first:  # a global zone: defaults for the rest
            defaults = own
    return tuple(zones)


def parse_pdta(path: str, pdta: bytes, chunks: dict[str, tuple[int, int]], base: int, smpl_frames: int
               ) -> tuple[tuple[Preset, ...], tuple[tuple[Zone, ...], ...], tuple[SampleHeader, ...]]:
    """Presets, instruments and sample headers of the pdta body, every index checked."""
    rec = {name: read_records(path, pdta, chunks, base, name) for name in RECORDS}
    samples = tuple(SampleHeader(raw[0].split(b"\0")[0].decode("latin-1"), raw[1], raw[2], raw[3], raw[4], raw[5],
                                 raw[6], raw[7], raw[9]) for raw in rec["shdr"][:-1])  # raw[8]: stereo link, unused
    for s in samples:
        if not 0 <= s.start <= s.end <= smpl_frames:
            raise malformed(path, "shdr", f"sample {s.name!r} spans frames {s.start}..{s.end}, "
                                          f"outside the {smpl_frames} of smpl")
    instruments = tuple(zones_of(path, "inst", rec["ibag"], rec["igen"], a[1], b[1], SAMPLE_ID)
                        for a, b in zip(rec["inst"], rec["inst"][1:]))
    for zones in instruments:
        if any(not 0 <= z.gens[SAMPLE_ID] < len(samples) for z in zones):
            raise malformed(path, "igen", f"a sampleID outside the {len(samples)} sample headers")
    presets = []
    for a, b in zip(rec["phdr"], rec["phdr"][1:]):
        zones = zones_of(path, "phdr", rec["pbag"], rec["pgen"], a[3], b[3], INSTRUMENT)
        if any(not 0 <= z.gens[INSTRUMENT] < len(instruments) for z in zones):
            raise malformed(path, "pgen", f"an instrument index outside the {len(instruments)} instruments")
        presets.append(Preset(a[0].split(b"\0")[0].decode("latin-1"), a[2], a[1], zones))
    return tuple(presets), instruments, samples


@functools.lru_cache(maxsize=4)
def _read_soundfont(path: str, size: int, mtime_ns: int) -> SoundFont:
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"sfbk":
            raise malformed(path, "RIFF", "the file does not start with RIFF....sfbk")
        riff_end = 8 + int.from_bytes(head[4:8], "little")
        if riff_end > size:
            raise malformed(path, "RIFF", f"says {riff_end} bytes but the file has {size}")
        top = read_chunks(f, path, 12, riff_end, "RIFF")
        parts = {}
        for name in ("INFO", "sdta", "pdta"):
            if "LIST:" + name not in top:
                raise malformed(path, name, "missing")
            offset, length = top["LIST:" + name]
            parts[name] = read_chunks(f, path, offset + 4, offset + length, name)
        info = {cid: read_small(f, path, cid, *span) for cid, span in parts["INFO"].items() if cid in ("ifil", "INAM")}
        if len(info.get("ifil", b"")) < 4 or info["ifil"][:2] != b"\x02\x00":
            raise malformed(path, "ifil", "version is not 2.x (SoundFont 3 holds compressed samples: "
                                          "use a .sf2 with 16-bit PCM)")
        if "smpl" not in parts["sdta"]:
            raise malformed(path, "smpl", "missing from sdta")
        smpl_offset, smpl_bytes = parts["sdta"]["smpl"]
        pdta_offset, pdta_size = top["LIST:pdta"]
        pdta = read_small(f, path, "pdta", pdta_offset, pdta_size)
    presets, instruments, samples = parse_pdta(path, pdta, parts["pdta"], pdta_offset, smpl_bytes // 2)
    name = info.get("INAM", b"").split(b"\0")[0].decode("latin-1")
    return SoundFont(path, name, presets, instruments, samples, smpl_offset, smpl_bytes // 2)


def read_small(f: BinaryIO, path: str, chunk: str, offset: int, size: int) -> bytes:
    """A metadata chunk's body, refused over MAX_META_BYTES."""
    if size > MAX_META_BYTES:
        raise malformed(path, chunk, f"{size} bytes, over the {MAX_META_BYTES} a metadata chunk may hold")
    f.seek(offset)
    return f.read(size)


def read_soundfont(path: str) -> SoundFont:
    """The parsed font at `path` (cached per process while the file is unchanged)."""
    st = os.stat(path)
    return _read_soundfont(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def read_frames(font: SoundFont, start: int, end: int) -> np.ndarray:
    """float32 [end - start] in [-1, 1): frames [start, end) of `smpl`, read from the file."""
    if not 0 <= start <= end <= font.smpl_frames:
        raise ValueError(f"{font.path}: frames {start}..{end} lie outside smpl's {font.smpl_frames}")
    with open(font.path, "rb") as f:
        f.seek(font.smpl_offset + 2 * start)
        raw = f.read(2 * (end - start))
    if len(raw) != 2 * (end - start):
        raise malformed(font.path, "smpl", f"ends before frame {end} (the file shrank?)")
    return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0


def note_zones(font: SoundFont, preset: Preset, key: int, velocity: int) -> list[tuple[Zone, Zone, SampleHeader]]:
    """(preset zone, instrument zone, sample) of every layer sounding `key` at `velocity` (ROM samples left out)."""
    out = []
    for pz in preset.zones:
        if not pz.covers(key, velocity):
            continue
        for iz in font.instruments[pz.gens[INSTRUMENT]]:
            sample = font.samples[iz.gens[SAMPLE_ID]]
            if iz.covers(key, velocity) and not sample.kind & ROM_SAMPLE and sample.end > sample.start:
                out.append((pz, iz, sample))
    return out
