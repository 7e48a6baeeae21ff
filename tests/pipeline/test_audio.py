"""Audio modality on real FSDD recordings: shapes, seeding, decode errors, resampling, token grids."""
from __future__ import annotations

import glob
import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile

from selfsup.pipeline.masking import conv_frames
from selfsup.pipeline.modalities import MODALITIES, DecodeError, make_modality
from selfsup.pipeline.modalities.audio import (OUTPUTS, AudioModality, augment_wave, random_resize_crop, resampler,
                                               speech_view)
from tests.conftest import FSDD as FSDD_PATH

FSDD = str(FSDD_PATH)
WAV2VEC2_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


@pytest.fixture(scope="module")
def wavs() -> list[bytes]:
    """Bytes of 20 real recordings spread over digits and speakers."""
    files = sorted(glob.glob(os.path.join(FSDD, "*.wav")))[::150][:20]
    return [open(f, "rb").read() for f in files]


@pytest.fixture(scope="module")
def decoded(wavs: list[bytes]) -> list[np.ndarray]:
    """The 20 recordings decoded at 16 kHz."""
    m = AudioModality()
    return [m.decode({"wav": w}) for w in wavs]


def rng(seed: int) -> np.random.Generator:
    """A fresh generator for `seed`."""
    return np.random.default_rng(seed)


def check_like(sample: dict[str, np.ndarray], expected: dict[str, tuple[tuple[int, ...], type]]) -> None:
    """`sample` has exactly the expected keys, shapes and dtypes, all finite."""
    assert sorted(sample) == sorted(expected)
    for k, (shape, dtype) in expected.items():
        assert sample[k].shape == shape and sample[k].dtype == dtype, (k, sample[k].shape, sample[k].dtype)
        assert np.isfinite(sample[k]).all()


@pytest.mark.parametrize("output", OUTPUTS)
def test_real_clips_give_promised_shapes_and_lengths(output: str, decoded: list[np.ndarray]) -> None:
    m = make_modality("audio", output=output)
    s, f, t = 16000, 64, 100
    spec = {"spec": ((f, t), np.float32)}
    wave = {"wave": ((s,), np.float32), "length": ((), np.int64)}
    train = {"logmel": {"view1": ((f, t), np.float32), "view2": ((f, t), np.float32)}, "spec": spec,
             "wave": wave}[output]
    evals = wave if output == "wave" else spec
    for i, x in enumerate(decoded):
        tr, ev = m.sample(x, rng(i), True), m.sample(x, rng(i), False)
        check_like(tr, train)
        check_like(ev, evals)
        check_like(m.blank(True), train)
        check_like(m.blank(False), evals)
        if output == "wave":
            for out in (tr, ev):
                n = int(out["length"])
                assert n == min(len(x), s)
                assert not out["wave"][n:].any() and out["wave"][:n].any()
    if output == "logmel":
        out = m.sample(decoded[0], rng(0), True)
        assert not np.allclose(out["view1"], out["view2"])


@pytest.mark.parametrize("output", OUTPUTS)
def test_eval_is_deterministic_and_train_follows_the_seed(output: str, decoded: list[np.ndarray]) -> None:
    m = AudioModality(output=output, noise_std=0.01)
    x = decoded[3]
    a, b = m.sample(x, rng(1), False), m.sample(x, rng(2), False)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    s1, s2, s3 = m.sample(x, rng(7), True), m.sample(x, rng(7), True), m.sample(x, rng(8), True)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert any(not np.array_equal(s1[k], s3[k]) for k in s1 if s1[k].ndim)


def test_eval_crop_is_centred_and_train_crops_vary(decoded: list[np.ndarray]) -> None:
    m = AudioModality(output="wave", sample_rate=16000, seconds=0.25)
    x = max(decoded, key=len)
    start = (len(x) - 4000) // 2
    assert np.array_equal(m.sample(x, rng(0), False)["wave"], x[start: start + 4000])
    plain = AudioModality(output="wave", seconds=0.25, gain_db=0.0)
    crops = {plain.sample(x, rng(i), True)["wave"].tobytes() for i in range(8)}
    assert len(crops) > 4


def test_resampling_8k_to_16k_doubles_the_length(wavs: list[bytes], decoded: list[np.ndarray]) -> None:
    for data, x in zip(wavs, decoded):
        info = soundfile.info(io.BytesIO(data))
        assert info.samplerate == 8000 and len(x) == 2 * info.frames
    same = AudioModality(sample_rate=8000).decode({"wav": wavs[0]})
    ref, _ = soundfile.read(io.BytesIO(wavs[0]), dtype="float32")
    assert np.array_equal(same, ref)


def test_other_containers_decode_through_pyav(wavs: list[bytes], decoded: list[np.ndarray]) -> None:
    ref, rate = soundfile.read(io.BytesIO(wavs[1]), dtype="float32")
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([ref, ref], 1), rate, format="OGG", subtype="VORBIS")
    x = AudioModality().decode({"ogg": buf.getvalue()})
    assert abs(len(x) - len(decoded[1])) <= 2 * 320
    n = min(len(x), len(decoded[1]))
    assert np.corrcoef(x[:n], decoded[1][:n])[0, 1] > 0.9  # lossy, but the same signal


def test_bad_bytes_raise_decode_error(wavs: list[bytes]) -> None:
    m = AudioModality()
    junk = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    bad = [{"wav": wavs[0][: len(wavs[0]) // 2]}, {"wav": b""}, {"wav": junk}, {"mp3": junk},
           {"flac": junk}, {"ogg": b"OggS" + junk}, {"txt": wavs[0]}]
    for members in bad:
        with pytest.raises(DecodeError):
            m.decode(members)
    with pytest.raises(DecodeError, match="max_seconds"):
        AudioModality(max_seconds=0.1).decode({"wav": wavs[0]})
    with pytest.raises(DecodeError, match="max_bytes"):
        AudioModality(max_bytes=1000).decode({"wav": wavs[0]})


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="output"):
        AudioModality(output="mfcc")
    with pytest.raises(ValueError, match="norm_stats"):
        AudioModality(norm_stats=(0.0, 0.0))


def test_token_grids_and_valid_tokens(decoded: list[np.ndarray]) -> None:
    geometry = {"conv_layers": WAV2VEC2_CONV}
    m = AudioModality(output="wave")
    assert m.token_grid(geometry) == (49,)
    short = min(decoded, key=len)
    sample = m.sample(short, rng(0), True)
    assert m.valid_tokens(sample, geometry) == conv_frames(len(short), WAV2VEC2_CONV) < 49
    spec = AudioModality(output="spec")
    assert spec.token_grid({"patch": [16, 10]}) == (4, 10)
    assert spec.valid_tokens(spec.sample(short, rng(0), True), {"patch": [16, 10]}) == 40
    with pytest.raises(ValueError, match="not divisible"):
        spec.token_grid({"patch": 16})
    assert "audio" in MODALITIES


def test_random_resize_crop_matches_byol_a() -> None:
    lms = np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32)
    same = random_resize_crop(lms, rng(0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
    assert np.array_equal(same, lms)  # full crop of a canvas the input fills
    out = random_resize_crop(lms, rng(0), (1.0, 1.5), (1.5, 1.5), (1.5, 1.5))
    assert out.shape == (64, 100)
    # the whole 1.5x-wide canvas is taken: the input is squeezed into the middle two thirds in time
    assert np.abs(out[:, :10]).max() < 1e-6 and np.abs(out[:, 40:60]).mean() > 0.3


SPEECH_OFF = dict(warp_freq=0.0, stretch_time=0.0, shift_frames=0, freq_masks=0, time_masks=0, mask_bins=8,
                  mask_frames=10)


def test_speech_view_parts() -> None:
    lms = np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32)
    assert np.array_equal(speech_view(lms, rng(0), silence=-1.5, **SPEECH_OFF), lms)
    delayed = speech_view(lms, rng(1), silence=-1.5, **{**SPEECH_OFF, "shift_frames": 20})
    k = int(np.argmax(~np.all(delayed == -1.5, axis=0)))  # first frame that is not silence
    assert 0 < k <= 20 and np.array_equal(delayed[:, k:], lms[:, : 100 - k])
    masked = speech_view(lms, rng(2), silence=-1.5, **{**SPEECH_OFF, "freq_masks": 3, "time_masks": 3})
    changed = masked != lms
    assert np.all(masked[changed] == 0.0) and changed.any()
    # a frequency warp above 1 pushes the top bins out; below 1 leaves silent bins on top
    ramp = np.repeat(np.linspace(-1, 1, 64, dtype=np.float32)[:, None], 100, axis=1)
    for seed in range(6):
        warped = speech_view(ramp, rng(seed), silence=-1.5, **{**SPEECH_OFF, "warp_freq": 0.25})
        assert warped.shape == (64, 100) and warped[0, 0] == pytest.approx(-1.0, abs=0.05)
        assert warped[-1, 0] == -1.5 or warped[-1, 0] >= 0.5
    stretched = speech_view(lms, rng(3), silence=-1.5, **{**SPEECH_OFF, "stretch_time": 0.3})
    assert stretched.shape == (64, 100) and not np.array_equal(stretched, lms)
    # the spectral colour adds one smooth curve over the mel axis to every frame, within ±2·tilt
    coloured = speech_view(lms, rng(4), silence=-1.5, **{**SPEECH_OFF, "tilt": 1.0})
    curve = coloured - lms
    assert np.allclose(curve, curve[:, :1], atol=1e-5) and 0 < np.abs(curve).max() <= 2.0
    second = np.diff(curve[:, 0], 2)  # a tilt plus a bow: a parabola, constant second difference
    assert np.allclose(second, second[0], atol=1e-5)
    with pytest.raises(ValueError, match="tilt must be >= 0"):
        AudioModality(views="speech", tilt=-1.0)


def test_speech_views_of_a_spoken_digit() -> None:
    digit = Path(FSDD) / "3_jackson_0.wav"
    m = AudioModality(views="speech", noise_std=0.0)
    wave = m.decode({"wav": digit.read_bytes()})
    s = m.sample(wave, rng(0), True)
    assert s["view1"].shape == s["view2"].shape == (64, 100) and s["view1"].dtype == np.float32
    assert not np.array_equal(s["view1"], s["view2"])
    silence = (np.log(1e-6) + 6.3) / 4.9  # zero padding after the default normalization
    for view in (s["view1"], s["view2"]):  # a 0.49 s clip, stretched ≤ 1.3x, delayed ≤ 0.2 s: 0.84 s at most
        tail = view[:, 85:]
        assert (np.isclose(tail, silence, atol=1e-3) | (tail == 0.0)).all()  # silent, or masked to the mean
        assert not np.isclose(view[:, :40], silence, atol=1e-3).all()  # the digit is in there
    with pytest.raises(ValueError, match="views 'crop' unknown; valid: rrc, speech"):
        AudioModality(views="crop")
    with pytest.raises(ValueError, match="warp_freq"):
        AudioModality(views="speech", warp_freq=1.5)


def test_gain_and_noise_leave_padding_silent() -> None:
    wave = np.zeros(1000, np.float32)
    wave[:600] = np.sin(np.arange(600, dtype=np.float32))
    gained = augment_wave(wave, 600, rng(0), 6.0, 0.0)
    ratio = gained[:600] / np.where(wave[:600] == 0, 1, wave[:600])
    assert 0.5 <= ratio[1] <= 2.0 and np.allclose(ratio[1:], ratio[1], rtol=1e-5)
    noisy = augment_wave(wave, 600, rng(0), 0.0, 0.1)
    assert not noisy[600:].any() and 0.03 < np.std(noisy[:600] - wave[:600]) < 0.15


# ---------------------------------------------------------------- resource bounds


def wav_at(rate: int, seconds: float = 1.0, hz: float = 440.0) -> bytes:
    """A real 16-bit WAV of a sine at `hz`, sampled at `rate`."""
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_an_odd_sample_rate_resamples_with_a_small_kernel_and_keeps_the_pitch() -> None:
    """4001 → 16000 Hz has no common factor: an exact polyphase kernel is [16000, 1, 4015] (2.5 GB to build)."""
    wave = AudioModality().decode({"wav": wav_at(4001)})  # an 8 KB file
    assert resampler(4001, 16000).kernel.numel() < 100_000
    assert abs(len(wave) - 16000) <= 8
    spectrum = np.abs(np.fft.rfft(wave[2000:14000]))  # 12000 samples at 16 kHz: 4/3 Hz bins
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440.0) < 2.0


def test_sample_rates_outside_1_to_384_khz_are_refused_naming_the_rate() -> None:
    m = AudioModality()
    for rate in (500, 500_000):
        with pytest.raises(DecodeError, match=f"sample rate {rate} Hz is outside 1000-384000 Hz"):
            m.decode({"wav": wav_at(rate, seconds=0.01)})
    with pytest.raises(ValueError, match="sample_rate=500 must lie in 1000-384000 Hz"):
        AudioModality(sample_rate=500)


def test_a_header_promising_too_much_pcm_is_refused_before_allocating_it() -> None:
    """A 200-byte FLAC whose STREAMINFO promises 59 s of 8 channels at 384 kHz (690 MiB of float32)."""
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((64, 8), np.float32), 384_000, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    fields = int.from_bytes(data[18:26], "big")  # STREAMINFO: rate 20 bits, channels 3, bits 5, frames 36
    data[18:26] = ((fields >> 36 << 36) | 59 * 384_000).to_bytes(8, "big")
    assert soundfile.info(io.BytesIO(bytes(data))).frames == 59 * 384_000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="22656000 frames × 8 channels, over 512 MiB"):
            AudioModality().decode({"flac": bytes(data)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


# ---------------------------------------------------------------- multi-crop (SwAV)

# sha256[:16] of the train arrays for seeds 0..2 of `tone()`, made by the code before multi-crop existed
AUDIO_BEFORE_MULTICROP = [({"views": "rrc"}, "96a7e8cd307886fd"),
                          ({"views": "speech", "tilt": 0.5, "mask_bins": 4, "shift_frames": 5}, "0ea49e057e4e7f9b"),
                          ({"output": "spec"}, "f167b51fca7af53a"), ({"output": "wave"}, "7118cb834d6d5e49")]


def tone() -> np.ndarray:
    """0.8 s of a 440 Hz tone in noise at 16 kHz, float32 [12800]."""
    t = np.arange(12800) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng(3).standard_normal(12800)).astype(np.float32)


@pytest.mark.parametrize("args, digest", AUDIO_BEFORE_MULTICROP, ids=lambda v: str(v))
def test_default_arguments_make_the_same_arrays_as_before_multicrop(args: dict, digest: str) -> None:
    import hashlib

    m, h = make_modality("audio", seconds=0.5, n_mels=32, **args), hashlib.sha256()
    for seed in range(3):
        sample = m.sample(tone(), rng(seed), True)
        assert "local" not in sample
        for k in sorted(sample):
            h.update(k.encode())
            h.update(np.ascontiguousarray(sample[k]).tobytes())
    assert h.hexdigest()[:16] == digest


@pytest.mark.parametrize("views", ["rrc", "speech"])
def test_local_crops_are_shorter_seeded_and_leave_the_views_alone(views: str) -> None:
    args = {"seconds": 0.5, "n_mels": 32, "views": views, "mask_bins": 4, "shift_frames": 5, "mask_frames": 5}
    m = make_modality("audio", **args, local_crops=3, local_seconds=0.2)
    a, again, other = (m.sample(tone(), rng(s), True) for s in (4, 4, 5))
    plain = make_modality("audio", **args).sample(tone(), rng(4), True)
    assert a["local"].shape == (3, 32, 20) and a["local"].dtype == np.float32 and np.isfinite(a["local"]).all()
    assert all(a[k].tobytes() == plain[k].tobytes() for k in ("view1", "view2"))
    assert all(a[k].tobytes() == again[k].tobytes() for k in a)
    assert a["local"].tobytes() != other["local"].tobytes()
    assert {k: (v.shape, v.dtype) for k, v in m.blank(True).items()} == {k: (v.shape, v.dtype) for k, v in a.items()}
    assert sorted(m.blank(False)) == ["spec"]


@pytest.mark.parametrize("args, named", [
    ({"local_crops": -1}, "local_crops=-1"),
    ({"local_crops": 2, "output": "spec"}, "local_crops needs output='logmel'"),
    ({"local_crops": 2, "local_seconds": 0.005}, "local_seconds=0.005"),
    ({"local_crops": 2, "local_seconds": 0.1, "views": "speech"}, "local_seconds=0.1"),
])
def test_invalid_audio_multicrop_arguments_raise_naming_them(args: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        make_modality("audio", **args)
