"""The SoundFont 2 reader and the `soundfont` source: a font built here by hand, and the real TimGM6mb."""
from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from selfsup.jobs.cli import main
from selfsup.pipeline import sf2
from selfsup.pipeline.sources import SourceOptions, detect_source, make_source
from selfsup.pipeline.sources.soundfont import GM_FAMILIES, SoundFontSource, render_note
from tests.conftest import SOUNDFONT

RATE_IN = 32000  # the hand-made font's sample rate
CYCLES = 64      # 440 Hz: one cycle is 32000 / 440 samples; loops cover whole cycles


def chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack("<I", len(body)) + body + (b"\0" if len(body) & 1 else b"")


def riff_list(kind: bytes, *chunks: bytes) -> bytes:
    return chunk(b"LIST", kind + b"".join(chunks))


def sine(freq: float, seconds: float) -> np.ndarray:
    """int16 [n]: a sine of `freq` Hz at RATE_IN, half scale."""
    t = np.arange(int(seconds * RATE_IN)) / RATE_IN
    return (np.sin(2 * np.pi * freq * t) * 16000).astype("<i2")


def make_font(path: Path, modes: int = 1, pgen_extra: bytes = b"") -> Path:
    """A font with a GM preset (program 24, guitar) and a drum kit (bank 128) over one instrument with two zones:
    velocities 0-63 play a 440 Hz sine recorded at root key 69; 64-127 the same sine with overridingRootKey 57
    (so it sounds an octave higher). Both 0.25 s, looping the last CYCLES cycles when `modes` is 1."""
    wave = sine(440.0, 0.25)
    period = RATE_IN / 440.0
    loop_end = int(round(int(len(wave) / period) * period))
    loop_start = int(round(loop_end - CYCLES * period))
    smpl = wave.tobytes() + bytes(2 * 46)  # the spec's 46 zero frames after each sample
    shdr = struct.pack("<20sIIIIIBbHH", b"sine", 0, len(wave), loop_start, loop_end, RATE_IN, 69, 0, 0, 1)
    shdr += struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    gen = lambda oper, amount: struct.pack("<Hh", oper, amount)  # noqa: E731
    rng = lambda oper, lo, hi: struct.pack("<HBB", oper, lo, hi)  # noqa: E731
    igen = (rng(43, 40, 90) + rng(44, 0, 63) + gen(54, modes) + gen(53, 0)
            + rng(43, 40, 90) + rng(44, 64, 127) + gen(54, modes) + gen(58, 57) + gen(53, 0) + gen(0, 0))
    ibag = struct.pack("<HHHHHH", 0, 0, 4, 0, 9, 0)
    inst = struct.pack("<20sH", b"sine", 0) + struct.pack("<20sH", b"EOI", 2)
    pgen = gen(41, 0) + gen(41, 0) + gen(0, 0) + pgen_extra
    pbag = struct.pack("<HHHHHH", 0, 0, 1, 0, 2, 0)
    phdr = (struct.pack("<20sHHHIII", b"Guitar", 24, 0, 0, 0, 0, 0) + struct.pack("<20sHHHIII", b"Kit", 0, 128, 1, 0, 0, 0)
            + struct.pack("<20sHHHIII", b"EOP", 0, 0, 2, 0, 0, 0))
    mod = bytes(10)
    body = b"sfbk" + riff_list(b"INFO", chunk(b"ifil", struct.pack("<HH", 2, 1)), chunk(b"INAM", b"test\0")) \
        + riff_list(b"sdta", chunk(b"smpl", smpl)) \
        + riff_list(b"pdta", chunk(b"phdr", phdr), chunk(b"pbag", pbag), chunk(b"pmod", mod), chunk(b"pgen", pgen),
                    chunk(b"inst", inst), chunk(b"ibag", ibag), chunk(b"imod", mod), chunk(b"igen", igen),
                    chunk(b"shdr", shdr))
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def peak_hz(wave: np.ndarray, rate: int = 16000) -> float:
    """The frequency of the largest FFT bin of the middle second (Hann window)."""
    x = wave[rate // 4: rate // 4 + rate]
    return float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * rate / len(x))


def test_pitch_loop_and_velocity_layers_of_a_hand_made_font(tmp_path):
    font = sf2.read_soundfont(str(make_font(tmp_path / "a.sf2")))
    assert font.name == "test" and [(p.bank, p.program) for p in font.presets] == [(0, 24), (128, 0)]
    guitar = font.presets[0]
    assert peak_hz(render_note(font, guitar, 69, 30)) == pytest.approx(440, abs=2)  # root key: as recorded
    assert peak_hz(render_note(font, guitar, 76, 30)) == pytest.approx(440 * 2 ** (7 / 12), abs=2)  # a fifth up
    assert peak_hz(render_note(font, guitar, 69, 100)) == pytest.approx(880, abs=2)  # the other zone: root 57
    quiet, loud = render_note(font, guitar, 69, 30), render_note(font, guitar, 69, 60)
    assert np.sqrt((quiet ** 2).mean() / (loud ** 2).mean()) == pytest.approx((30 / 60) ** 2, rel=1e-3)
    assert np.abs(quiet[16000:17000]).max() > 0.01  # 1 s in: still sounding, from the loop of a 0.25 s sample
    assert np.abs(quiet[-10:]).max() < np.abs(quiet[16000:17000]).max() / 20  # the release ends it
    with pytest.raises(ValueError, match="plays no sample at key 30"):
        render_note(font, guitar, 30, 30)  # below the key range 40-90

    once = sf2.read_soundfont(str(make_font(tmp_path / "b.sf2", modes=0)))
    note = render_note(once, once.presets[0], 69, 30)
    assert np.abs(note[: 16000 // 5]).max() > 0.01 and not note[16000 // 4 + 2:].any()  # no loop: stops at the end


def test_items_of_a_hand_made_font_skip_drums_and_split_by_note(tmp_path):
    make_font(tmp_path / "a.sf2")
    subsets = {sub: make_source("soundfont", str(tmp_path), SourceOptions("audio", "auto", sub, 3)).items()[0]
               for sub in ("train", "test", "all")}
    every = subsets["all"]
    assert {it.extra["program"] for it in every} == {24} and {it.label for it in every} == {3}  # guitar family
    assert sorted(it.extra["key"] for it in every) == sorted(k for k in range(42, 91, 3) for _ in range(3))
    notes = {sub: {it.extra["note_id"] for it in items} for sub, items in subsets.items()}
    assert notes["train"] and notes["test"] and not notes["train"] & notes["test"]
    assert notes["train"] | notes["test"] == notes["all"]
    assert len(notes["test"]) == round(0.25 * len(notes["all"]))
    other = make_source("soundfont", str(tmp_path), SourceOptions("audio", "auto", "test", 4)).items()[0]
    assert {it.extra["note_id"] for it in other} != notes["test"]  # the seed draws the split
    members = SoundFontSource(str(tmp_path)).encode(every[0])
    wave, rate = soundfile.read(io.BytesIO(members["flac"]))
    assert rate == 16000 and wave.shape == (24000,)


def test_a_malformed_font_names_the_chunk(tmp_path):
    good = make_font(tmp_path / "a.sf2").read_bytes()
    (tmp_path / "cut.sf2").write_bytes(good[: len(good) - 60])
    with pytest.raises(ValueError, match=r"cut.sf2: malformed SoundFont, chunk 'RIFF': says \d+ bytes but the file"):
        sf2.read_soundfont(str(tmp_path / "cut.sf2"))
    cut = good[:4] + struct.pack("<I", len(good) - 68) + good[8: len(good) - 60]  # RIFF size agreeing with the file
    (tmp_path / "cut2.sf2").write_bytes(cut)
    with pytest.raises(ValueError, match=r"chunk 'LIST': says \d+ bytes at byte \d+ but RIFF has \d+ left"):
        sf2.read_soundfont(str(tmp_path / "cut2.sf2"))
    make_font(tmp_path / "pgen.sf2", pgen_extra=b"\0\0")  # 14 bytes: not whole 4-byte records
    with pytest.raises(ValueError, match=r"chunk 'pgen': 14 bytes is not a positive multiple of its 4-byte records"):
        sf2.read_soundfont(str(tmp_path / "pgen.sf2"))
    (tmp_path / "wav.sf2").write_bytes(b"RIFF" + good[4:8] + b"WAVE" + good[12:])
    with pytest.raises(ValueError, match="chunk 'RIFF'"):
        sf2.read_soundfont(str(tmp_path / "wav.sf2"))


def test_timgm6mb_notes_split_by_note_with_general_midi_families():
    path = str(SOUNDFONT / "TimGM6mb.sf2")
    assert detect_source(path, "audio") == "soundfont"
    items = {sub: make_source("soundfont", path, SourceOptions("audio", "auto", sub, 0)).items()
             for sub in ("train", "test")}
    (train, names), (test, _) = items["train"], items["test"]
    assert names == list(GM_FAMILIES) and len(names) == 16
    assert {it.label for it in train} == set(range(16)) == {it.label for it in test}
    assert all(it.label == it.extra["program"] // 8 for it in train + test)
    notes = [{(it.extra["program"], it.extra["key"]) for it in part} for part in (train, test)]
    assert not notes[0] & notes[1] and len(notes[0] | notes[1]) >= 128 * 15
    assert 0.2 < len(test) / (len(train) + len(test)) < 0.3


def test_shards_write_soundfont_end_to_end(tmp_path):
    dest = str(tmp_path / "instruments")
    assert main(["shards", "write", str(SOUNDFONT / "TimGM6mb.sf2"), dest, "--modality", "audio", "--split",
                 "probe-test", "--source-type", "soundfont", "--subset", "test", "--limit", "6", "--workers", "1",
                 "--quiet"]) == 0
    tars = sorted(Path(dest).rglob("*.tar"))
    with tarfile.open(tars[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    keys = {name.rsplit(".", 1)[0] for name in members}
    assert len(keys) == 6 and all(k.startswith("TimGM6mb-p") for k in keys)
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        assert int(members[f"{key}.cls"]) == meta["program"] // 8 and meta["label_name"] == GM_FAMILIES[meta["family"]]
        wave, rate = soundfile.read(io.BytesIO(members[f"{key}.flac"]))
        assert rate == 16000 and wave.shape == (24000,) and np.abs(wave).max() > 0
