"""Audio modality on real FSDD recordings: shapes, seeding, decode errors, resampling, token grids."""
from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
import soundfile

from pipeline.masking import conv_frames
from pipeline.modalities import MODALITIES, DecodeError, make_modality
from pipeline.modalities.audio import OUTPUTS, AudioModality, augment_wave, random_resize_crop

FSDD = "/work/shared/datasets/fsdd/recordings"
WAV2VEC2_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
pytestmark = pytest.mark.skipif(not os.path.isdir(FSDD), reason="FSDD recordings not present")


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


def test_gain_and_noise_leave_padding_silent() -> None:
    wave = np.zeros(1000, np.float32)
    wave[:600] = np.sin(np.arange(600, dtype=np.float32))
    gained = augment_wave(wave, 600, rng(0), 6.0, 0.0)
    ratio = gained[:600] / np.where(wave[:600] == 0, 1, wave[:600])
    assert 0.5 <= ratio[1] <= 2.0 and np.allclose(ratio[1:], ratio[1], rtol=1e-5)
    noisy = augment_wave(wave, 600, rng(0), 0.0, 0.1)
    assert not noisy[600:].any() and 0.03 < np.std(noisy[:600] - wave[:600]) < 0.15
