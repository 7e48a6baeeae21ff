"""`soundfont`: notes rendered from SoundFont 2 presets of bank 0; label = General MIDI family.

SOURCE is a `.sf2` file or a folder of them (each file's notes keyed by its name). For every
preset of bank 0 (General MIDI program p, family p // 8; drums, bank 128, and other banks are
skipped), every KEY_STEP-th key of MIDI KEYS that the preset plays is rendered at each of
VELOCITIES: 1.5 s at 16 kHz mono, written as 16-bit FLAC, `.cls` = family index, `.json`
{program, family, preset, key, velocity, note_id, soundfont}.

Rendering, simplified: every layer (preset zone × instrument zone) that covers (key, velocity)
plays its sample, resampled by linear interpolation at the pitch ratio to its root key
(overridingRootKey, else the sample's; coarse and fine tune, scale tuning and the sample's pitch
correction, preset-level amounts added), low-passed first when it is played faster than the output
rate can hold; with a loop mode it loops the sustain loop, else it stops at the sample's end. The
layers are summed with their initial attenuation and a (velocity / 127)² gain (the spec's default
velocity curve, roughly), then a fixed envelope (10 ms linear attack, 300 ms linear release at
the end) and a peak limit of 0.99. No filters, modulators, LFOs, per-zone envelopes, chorus or
reverb.

Split (`--subset train|test|all`): by note, never by velocity. For each (font, program) the
notes' keys are permuted by a generator seeded from (seed, font, program) and the first
TEST_FRACTION of them (at least one when there are two or more) are `test`, the rest `train`:
the same (program, key) at different velocities never lands in both. Write both subsets with
the same `--seed`.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np

from selfsup.pipeline import sf2
from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.sources.base import (DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, SourceOptions, file_fingerprint,
                                           sanitize_key)

GM_FAMILIES = ("piano", "chromatic-percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
               "reed", "pipe", "synth-lead", "synth-pad", "synth-effects", "ethnic", "percussive", "sound-effects")
KEYS, KEY_STEP = (36, 96), 3       # MIDI keys rendered: 36, 39, ..., 96
VELOCITIES = (40, 80, 120)
SECONDS, RATE = 1.5, 16000
ATTACK, RELEASE, PEAK = 0.01, 0.3, 0.99  # seconds, seconds, largest output amplitude
TEST_FRACTION = 0.25
SUBSETS = ("train", "test", "all")


def pitch_ratio(pz: sf2.Zone, iz: sf2.Zone, sample: sf2.SampleHeader, key: int) -> float:
    """How much faster than recorded the sample plays for `key` (2 ** (cents / 1200))."""
    root = iz.gens.get(sf2.ROOT_KEY, pz.gens.get(sf2.ROOT_KEY, -1))
    if not 0 <= root <= 127:
        root = sample.root_key if sample.root_key <= 127 else 60
    def gen(oper: int, default: int = 0) -> int:  # preset-level amounts add to the instrument's
        return iz.gens.get(oper, default) + pz.gens.get(oper, 0)

    cents = ((key - root) * gen(sf2.SCALE_TUNING, 100) + 100 * gen(sf2.COARSE_TUNE) + gen(sf2.FINE_TUNE)
             + sample.correction)
    return float(2.0 ** (cents / 1200.0))


def addresses(iz: sf2.Zone, s: sf2.SampleHeader) -> tuple[int, int, int, int]:
    """(start, end, loop_start, loop_end) in smpl frames after the zone's address offsets, clamped to the sample."""
    def moved(value: int, fine: int, coarse: int) -> int:
        return value + iz.gens.get(fine, 0) + 32768 * iz.gens.get(coarse, 0)

    start = min(max(moved(s.start, sf2.START_OFFSET, sf2.START_COARSE), s.start), s.end)
    end = min(max(moved(s.end, sf2.END_OFFSET, sf2.END_COARSE), start), s.end)
    loop_start = moved(s.loop_start, sf2.LOOP_START_OFFSET, sf2.LOOP_START_COARSE)
    loop_end = moved(s.loop_end, sf2.LOOP_END_OFFSET, sf2.LOOP_END_COARSE)
    return start, end, loop_start, loop_end


def lowpass(x: np.ndarray, keep: float) -> np.ndarray:
    """float32 [n]: `x` with the spectrum above `keep` × its Nyquist removed (FFT brick wall)."""
    spectrum = np.fft.rfft(x)
    spectrum[int(len(spectrum) * keep) + 1:] = 0
    return np.fft.irfft(spectrum, len(x)).astype(np.float32)


def play_positions(n: int, step: float, end: int, loop: Optional[tuple[int, int]]) -> np.ndarray:
    """float64 [n]: the sample position read at each output frame, wrapped into the loop past its end."""
    pos = np.arange(n) * step
    if loop is not None:
        ls, le = loop
        past = pos >= le
        pos[past] = ls + np.mod(pos[past] - ls, le - ls)
    return pos


def render_layer(font: sf2.SoundFont, pz: sf2.Zone, iz: sf2.Zone, sample: sf2.SampleHeader, key: int,
                 n: int, rate: int) -> np.ndarray:
    """float32 [n]: one layer of a note at `rate`, before velocity gain and envelope."""
    start, end, loop_start, loop_end = addresses(iz, sample)
    step = pitch_ratio(pz, iz, sample, key) * sample.rate / rate  # sample frames per output frame
    loops = iz.gens.get(sf2.SAMPLE_MODES, 0) & 1 and start <= loop_start < loop_end - 1 and loop_end <= end
    loop = (loop_start - start, loop_end - start) if loops else None
    pos = play_positions(n, step, end - start, loop)
    data = sf2.read_frames(font, start, min(end, start + int(pos.max()) + 2))  # [frames]
    if step > 1:
        data = lowpass(data, 1.0 / step)
    wave = np.interp(pos, np.arange(len(data)), data, right=0.0) if len(data) else np.zeros(n)
    atten = iz.gens.get(sf2.ATTENUATION, 0) + pz.gens.get(sf2.ATTENUATION, 0)  # centibels
    return (wave * 10.0 ** (-max(atten, 0) / 200.0)).astype(np.float32)


def envelope(n: int, rate: int) -> np.ndarray:
    """float32 [n]: linear attack from 0, hold at 1, linear release to 0 over the last RELEASE seconds."""
    env = np.ones(n, np.float32)
    a, r = min(int(ATTACK * rate), n), min(int(RELEASE * rate), n)
    env[:a] = np.linspace(0, 1, a, endpoint=False)
    if r:
        env[n - r:] *= np.linspace(1, 0, r)
    return env


def render_note(font: sf2.SoundFont, preset: sf2.Preset, key: int, velocity: int, seconds: float = SECONDS,
                rate: int = RATE) -> np.ndarray:
    """float32 [round(seconds * rate)] in [-PEAK, PEAK]: `preset` playing `key` at `velocity`."""
    layers = sf2.note_zones(font, preset, key, velocity)
    if not layers:
        raise ValueError(f"{font.path}: preset {preset.name!r} plays no sample at key {key}, velocity {velocity}")
    n = int(round(seconds * rate))
    wave = sum(render_layer(font, pz, iz, s, key, n, rate) for pz, iz, s in layers)
    wave = np.asarray(wave, np.float32) * (velocity / 127.0) ** 2 * envelope(n, rate)
    peak = float(np.abs(wave).max())
    return wave * (PEAK / peak) if peak > PEAK else wave


def font_paths(root: str) -> list[str]:
    """The .sf2 files SOURCE names: itself, or those in the folder (sorted, links to the same file once)."""
    if os.path.isfile(root):
        return [root]
    names = sorted(f for f in os.listdir(root) if f.lower().endswith(".sf2"))
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(os.path.realpath(os.path.join(root, name)), os.path.join(root, name))
    return sorted(seen.values())


def held_out_keys(keys: list[int], seed: int, font: str, program: int) -> set[int]:
    """The keys of one (font, program) that form the test subset (see the module docstring)."""
    if len(keys) < 2:
        return set()
    order = rng_for("soundfont-split", seed, font, program).permutation(len(keys))
    count = max(1, int(round(TEST_FRACTION * len(keys))))
    return {keys[int(i)] for i in order[:count]}


def gm_presets(font: sf2.SoundFont) -> dict[int, sf2.Preset]:
    """General MIDI program → the first preset of bank 0 with that program, in file order."""
    out: dict[int, sf2.Preset] = {}
    for p in font.presets:
        if p.bank == 0:
            out.setdefault(p.program, p)
    return out


def encode_flac(wave: np.ndarray, rate: int) -> bytes:
    """16-bit mono FLAC bytes of float32 [n] in [-1, 1]."""
    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@SOURCES.register("soundfont")
@dataclass(frozen=True)
class SoundFontSource:
    """Notes of the General MIDI presets of SoundFont 2 files; label = GM family (see the module docstring)."""

    root: str
    subset: str = "train"
    labels: str = "auto"
    seed: int = 0

    natural_modality: ClassVar[Optional[str]] = "audio"

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> SoundFontSource:
        """Reads the subset (train, test or all), the labels setting and the seed of the split."""
        if options.subset not in SUBSETS:
            raise ValueError(f"--subset must be one of {', '.join(SUBSETS)} for a SoundFont, got {options.subset!r}")
        return cls(root, subset=options.subset, labels=options.labels, seed=options.seed)

    @staticmethod
    def detect(root: str) -> bool:
        """A .sf2 file, or a folder holding .sf2 files."""
        if os.path.isfile(root):
            return root.lower().endswith(".sf2")
        return os.path.isdir(root) and any(f.lower().endswith(".sf2") for f in os.listdir(root))

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per (font, program, key, velocity) of the subset, in that order."""
        keep = self.labels != "none"
        items: list[Item] = []
        for path in font_paths(self.root):
            items += self.font_items(path, keep)
        return items, list(GM_FAMILIES) if keep else []

    def font_items(self, path: str, keep: bool) -> list[Item]:
        """The items of one font file."""
        font = sf2.read_soundfont(path)
        stem = sanitize_key(os.path.splitext(os.path.basename(path))[0])
        _, fingerprint = file_fingerprint(path)
        out = []
        for program, preset in sorted(gm_presets(font).items()):
            notes = [(k, v) for k in range(KEYS[0], KEYS[1] + 1, KEY_STEP) for v in VELOCITIES
                     if sf2.note_zones(font, preset, k, v)]
            held_out = held_out_keys(sorted({k for k, _ in notes}), self.seed, stem, program)
            for key, velocity in notes:
                if self.subset != "all" and (key in held_out) != (self.subset == "test"):
                    continue
                extra: dict[str, Any] = {"key": key, "velocity": velocity, "soundfont": stem,
                                         "note_id": f"{stem}/{program}/{key}"}
                if keep:
                    extra.update(program=program, family=program // 8, preset=preset.name)
                out.append(Item(f"{stem}-p{program:03d}-k{key:03d}-v{velocity:03d}",
                                (path, program, key, velocity), program // 8 if keep else None, extra,
                                int(SECONDS * RATE), f"{fingerprint}-{program}-{key}-{velocity}"))
        return out

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The rendered note as 16-bit FLAC .

        Reads the font's pdta chunk (cached) and the note's sample frames only, never the whole file,
        so `max_bytes` (a limit on whole files read) does not apply.
        """
        path, program, key, velocity = item.ref
        font = sf2.read_soundfont(path)
        preset = gm_presets(font)[program]
        return {"flac": encode_flac(render_note(font, preset, key, velocity), RATE)}
