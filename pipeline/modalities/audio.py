"""Audio: decode WAV/FLAC with soundfile (others with PyAV), crop, augment, make log-mel views.

Shapes are fixed by the config: S = round(seconds * sample_rate) samples, F = n_mels bins,
T = S // hop_length frames. The STFT is centred, which gives S // hop + 1 frames; the last one
is dropped so T is round (1 s at hop 160 → 100, Audio-MAE's 10.24 s → 1024).

Outputs (per sample):
- `logmel` (BYOL-A / SimCLR): two independent crops of the clip, each with random gain and
  noise, log-mel, normalized, then per view either BYOL-A's random resize crop (`views="rrc"`)
  or the speech chain (`views="speech"`) → view1, view2 float32 [F, T].

The speech chain is for short, start-aligned utterances (spoken digits, keywords), where a random
crop in time can cut the word away and leave two views of silence: it warps the frequency axis
(vocal tract length perturbation, after Jaitly & Hinton 2013: another speaker's formants), stretches
time (another speaker's tempo), delays the start a little, and masks frequency bands and time
spans (SpecAugment, Park et al. 2019), and with `tilt` colours the spectrum (a random tilt and bow
across the mel axis: another microphone, room or voice quality). Everything the views share is
then the word, not the speaker or the recording — which is what a held-out-speaker probe asks for
(docs/quality.md).
  Multi-crop (SwAV): `local_crops=K` adds local float32 [K, F, T_local], K shorter crops of
  `local_seconds` each, made like the views and drawn after them (view1/view2 keep their bytes).
- `spec` (Audio-MAE): one crop with gain and noise, log-mel, normalized → spec float32 [F, T].
- `wave` (wav2vec 2.0): one crop with gain and noise → wave float32 [S], length int64 [].
Eval takes the centre crop without augmentation: wave + length for `wave`, else spec.

Normalization: fixed constants `norm_stats=(mean, std)` on log(mel + 1e-6). The defaults were
measured on the unpadded frames of FSDD speech at the default settings (close to BYOL-A's
AudioSet numbers, -5.5 and 5.0); pass your data's numbers, or None for
per-sample standardization (which also undoes the gain augmentation, hence not the default).
Normalization comes before the random resize crop, as in BYOL-A, so the crop's empty virtual
canvas (zeros) reads as the average level rather than as loud sound.

Padding: clips shorter than S are zero-padded at the end; `length` counts the real samples.
Spectrogram outputs treat every patch as valid (their token grid is frequency-major, so the
padded frames are not a leading block of tokens).
"""
from __future__ import annotations

import contextlib
import functools
import io
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import cv2
import numpy as np

if TYPE_CHECKING:
    import torchaudio

from selfsup.pipeline.media import EXTENSIONS
from selfsup.pipeline.modalities import MODALITIES
from selfsup.pipeline.modalities.base import DecodeError, Sample, float_pair, media_member

OUTPUTS = ("logmel", "spec", "wave")
VIEWS = ("rrc", "speech")
SOUNDFILE_EXTS = ("wav", "flac")
LOG_EPS = 1e-6
MIN_RATE, MAX_RATE = 1_000, 384_000  # sample rates decoded, Hz: below telephone band to the top studio rate
MAX_RATIO_TERM = 1000  # largest term of a resampling ratio (the kernel is new × (orig + 2 × width) of the terms)
MAX_PCM_BYTES = 512 * 2**20  # float32 frames × channels one item may decode to
FSDD_LOGMEL_STATS = (-6.3, 4.9)  # mean, std of log(mel + 1e-6) over unpadded FSDD frames, defaults


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread (a data worker owns one core), restoring the setting after."""
    import torch  # here, not at the top: importing the registry must not cost a torch import

    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


# ---------------------------------------------------------------- decoding


def wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE file is truncated (a chunk or RIFF size past the end), or None."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None  # not plain RIFF (RF64, W64, junk): left to the decoder
    riff = int.from_bytes(data[4:8], "little")
    if riff not in (0, 0xFFFFFFFF) and riff + 8 > len(data):
        return f"RIFF size says {riff + 8} bytes but the file has {len(data)}"
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos: pos + 4], int.from_bytes(data[pos + 4: pos + 8], "little")
        if cid == b"data":
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data):
                return f"data chunk says {size} bytes but only {len(data) - pos - 8} follow"
            return None
        pos += 8 + size + (size & 1)
    return "no data chunk"


def check_pcm(frames: int, channels: int, rate: int, max_seconds: float) -> None:
    """DecodeError unless `rate` lies in [MIN_RATE, MAX_RATE] and frames × channels fit the limits."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DecodeError(f"audio sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz: resample the file")
    if frames / rate > max_seconds:
        raise DecodeError(f"audio is {frames / rate:.1f} s, over max_seconds={max_seconds}: "
                          "split it or raise the limit")
    if frames * channels * 4 > MAX_PCM_BYTES:
        raise DecodeError(f"audio decodes to {frames} frames × {channels} channels, over {MAX_PCM_BYTES >> 20} MiB "
                          "of float32: split it or mix it down")


def read_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """(float32 [n, C], rate) of a WAV/FLAC via libsndfile; DecodeError when bad or too long."""
    import soundfile  # loads with the first WAV/FLAC: a machine without it still trains images
    reason = wav_truncation(data)
    if reason:
        raise DecodeError(f"truncated WAV: {reason}")
    try:
        info = soundfile.info(io.BytesIO(data))
        check_pcm(info.frames, info.channels, info.samplerate, max_seconds)
        x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # [n, C]
    except soundfile.SoundFileError as e:
        raise DecodeError(f"libsndfile cannot read this audio: {e}") from None
    if info.frames > 0 and len(x) < info.frames:
        raise DecodeError(f"truncated audio: header promises {info.frames} frames, found {len(x)}")
    return x, int(rate)


def read_pyav(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """(float32 [n, C], rate) of any container FFmpeg reads (mp3, ogg, m4a, opus)."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise DecodeError("container has no audio stream")
            stream = container.streams.audio[0]
            rate = int(stream.rate or stream.codec_context.sample_rate or 0)
            check_pcm(0, 1, rate, max_seconds)
            to_float = av.AudioResampler(format="fltp")  # planar float, layout and rate kept
            chunks, n = [], 0
            for frame in container.decode(stream):
                for f in to_float.resample(frame):
                    chunks.append(f.to_ndarray())  # [C, k]
                    n += chunks[-1].shape[1]
                check_pcm(n, len(chunks[-1]) if chunks else 1, rate, max_seconds)
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg raises many types for junk
        raise DecodeError(f"FFmpeg cannot read this audio: {type(e).__name__}: {e}") from None
    if not chunks:
        raise DecodeError("audio stream holds no samples")
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate  # [n, C]


def rate_ratio(rate: int, sample_rate: int) -> tuple[int, int]:
    """(orig, new) terms resampling `rate` to `sample_rate` with both terms at most MAX_RATIO_TERM.

    torchaudio's kernel and its cost per sample grow with the terms of the reduced ratio (4001 → 16000
    Hz is 4001 → 16000: 2.5 GB and 18 s for 1 s of audio). Ratios of common rates have small terms
    (44.1 → 16 kHz is 441 → 160) and stay exact; any other is replaced by the nearest ratio with small
    terms, which plays it at most 0.06% (1 cent) fast or slow (4001 → 16000 becomes 1 → 4).
    """
    exact = Fraction(sample_rate, rate)
    if max(exact.numerator, exact.denominator) <= MAX_RATIO_TERM:
        return exact.denominator, exact.numerator
    if exact <= 1:
        near = exact.limit_denominator(MAX_RATIO_TERM)
        return near.denominator, max(near.numerator, 1)
    near = (1 / exact).limit_denominator(MAX_RATIO_TERM)
    return max(near.numerator, 1), near.denominator


@functools.lru_cache(maxsize=16)
def resampler(rate: int, sample_rate: int) -> "torchaudio.transforms.Resample":
    """torchaudio's sinc resampler with its kernel computed once per rate pair (see `rate_ratio`)."""
    import torchaudio

    return torchaudio.transforms.Resample(*rate_ratio(rate, sample_rate))


def resample(wave: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """float32 [n] at `rate` → float32 [about n * sample_rate / rate] (torchaudio's sinc resampler)."""
    import torch

    if rate == sample_rate:
        return wave
    with one_torch_thread():
        out = resampler(rate, sample_rate)(torch.from_numpy(np.ascontiguousarray(wave)))
    return out.numpy()


def decode_audio(ext: str, data: bytes, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Mono float32 [n] at `sample_rate`; DecodeError for junk, truncation, or too long."""
    read = read_soundfile if ext in SOUNDFILE_EXTS else read_pyav
    x, rate = read(data, max_seconds)  # [n, C]
    if x.shape[0] == 0:
        raise DecodeError(f".{ext} holds no audio samples")
    wave = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]  # [n]
    if not np.isfinite(wave).all():
        raise DecodeError(f".{ext} holds NaN or infinite samples")
    return np.ascontiguousarray(resample(wave, rate, sample_rate), dtype=np.float32)


# ---------------------------------------------------------------- waveform ops


def crop_wave(wave: np.ndarray, size: int, rng: np.random.Generator | None) -> tuple[np.ndarray, int]:
    """A [size] crop (random when rng is given, centred when not), zero-padded; and its valid length."""
    n = len(wave)
    if n >= size:
        start = int(rng.integers(0, n - size + 1)) if rng is not None else (n - size) // 2
        return wave[start: start + size].copy(), size
    out = np.zeros(size, np.float32)
    out[:n] = wave
    return out, n


def augment_wave(wave: np.ndarray, length: int, rng: np.random.Generator, gain_db: float,
                 noise_std: float) -> np.ndarray:
    """Random gain in ±gain_db, then Gaussian noise of noise_std × the clip's RMS on the valid part."""
    if gain_db > 0:
        wave = wave * np.float32(10.0 ** (rng.uniform(-gain_db, gain_db) / 20.0))
    if noise_std > 0 and length > 0:
        rms = float(np.sqrt(np.mean(np.square(wave[:length], dtype=np.float64))))
        wave = wave.copy()
        wave[:length] += (rng.standard_normal(length) * (noise_std * rms)).astype(np.float32)
    return wave


# ---------------------------------------------------------------- spectrogram ops


def random_resize_crop(lms: np.ndarray, rng: np.random.Generator, virtual: tuple[float, float],
                       freq_scale: tuple[float, float], time_scale: tuple[float, float]) -> np.ndarray:
    """BYOL-A's RandomResizeCrop: crop a region of a zero canvas holding `lms`, resize back to [F, T].

    The canvas is `virtual` times the input (frequency, time) with the input in its centre;
    the crop is (freq_scale × F, time_scale × T), clipped to the canvas, resized bilinearly.
    """
    f, t = lms.shape  # [F, T]
    ch, cw = int(f * virtual[0]), int(t * virtual[1])
    canvas = np.zeros((ch, cw), np.float32)
    y, x = (ch - f) // 2, (cw - t) // 2
    canvas[y: y + f, x: x + t] = lms
    h = min(max(int(rng.uniform(*freq_scale) * f), 1), ch)
    w = min(max(int(rng.uniform(*time_scale) * t), 1), cw)
    i, j = int(rng.integers(0, ch - h + 1)), int(rng.integers(0, cw - w + 1))
    return cv2.resize(canvas[i: i + h, j: j + w], (t, f), interpolation=cv2.INTER_LINEAR)


def fit_axis(x: np.ndarray, n: int, axis: int, fill: float) -> np.ndarray:
    """Crop `x` to n along axis (keeping the start), or pad its end with `fill`."""
    m = x.shape[axis]
    if m >= n:
        return x[:n] if axis == 0 else x[:, :n]
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, n - m)
    return np.pad(x, pad, constant_values=fill)


def speech_view(lms: np.ndarray, rng: np.random.Generator, warp_freq: float, stretch_time: float,
                shift_frames: int, freq_masks: int, time_masks: int, mask_bins: int, mask_frames: int,
                silence: float, tilt: float = 0.0) -> np.ndarray:
    """One view of a normalized log-mel [F, T] by the speech chain (module doc); float32 [F, T].

    Frequency warp by a factor in 1 ± warp_freq (bins above F cut, missing ones silent), time
    stretch by 1 ± stretch_time anchored at the start, a delay of 0..shift_frames silent frames,
    a spectral colour (a tilt a·u and a bow b·(u² − 1/3) over u = −1..1 across the mel bins, a and b
    uniform in ±tilt, in normalized log-mel units), then freq_masks bands of 0..mask_bins bins and
    time_masks spans of 0..mask_frames frames set to 0 (the mean level after normalization).
    """
    f, t = lms.shape
    x = lms
    if warp_freq > 0:
        nf = max(8, int(round(f * rng.uniform(1 - warp_freq, 1 + warp_freq))))
        x = fit_axis(cv2.resize(x, (t, nf), interpolation=cv2.INTER_LINEAR), f, 0, silence)
    if stretch_time > 0:
        nt = max(8, int(round(t * rng.uniform(1 - stretch_time, 1 + stretch_time))))
        x = fit_axis(cv2.resize(x, (nt, f), interpolation=cv2.INTER_LINEAR), t, 1, silence)
    out = np.full((f, t), silence, np.float32)
    k = int(rng.integers(0, shift_frames + 1)) if shift_frames > 0 else 0
    out[:, k:] = x[:, : t - k]
    if tilt > 0:
        u = np.linspace(-1.0, 1.0, f, dtype=np.float32)[:, None]
        a, b = rng.uniform(-tilt, tilt, 2)
        out += np.float32(a) * u + np.float32(b) * (u * u - np.float32(1 / 3))
    for _ in range(freq_masks):
        w = int(rng.integers(0, mask_bins + 1))
        lo = int(rng.integers(0, f - w + 1))
        out[lo: lo + w] = 0.0
    for _ in range(time_masks):
        w = int(rng.integers(0, mask_frames + 1))
        lo = int(rng.integers(0, t - w + 1))
        out[:, lo: lo + w] = 0.0
    return out


def normalize(lms: np.ndarray, stats: tuple[float, float] | None) -> np.ndarray:
    """(lms - mean) / std with fixed stats, or per-sample standardization when stats is None."""
    if stats is None:
        return (lms - lms.mean()) / (lms.std() + 1e-5)
    return (lms - np.float32(stats[0])) / np.float32(stats[1])


@MODALITIES.register("audio")
class AudioModality:
    """Audio files → BYOL-A log-mel views, one log-mel spectrogram (Audio-MAE), or a waveform (wav2vec 2.0)."""

    name = "audio"
    extensions = EXTENSIONS["audio"]

    def __init__(self, sample_rate: int = 16000, seconds: float = 1.0, output: str = "logmel",
                 n_mels: int = 64, n_fft: int = 400, win_length: int | None = None, hop_length: int = 160,
                 f_min: float = 0.0, f_max: float | None = None, gain_db: float = 6.0, noise_std: float = 0.0,
                 rrc_scale: tuple[float, float] | None = (0.6, 1.5), rrc_virtual: tuple[float, float] = (1.0, 1.5),
                 norm_stats: tuple[float, float] | None = FSDD_LOGMEL_STATS, max_seconds: float = 60.0,
                 max_bytes: int = 64_000_000, views: str = "rrc", warp_freq: float = 0.25,
                 stretch_time: float = 0.3, shift_frames: int = 20, freq_masks: int = 2, time_masks: int = 2,
                 mask_bins: int = 8, mask_frames: int = 10, tilt: float = 0.0, local_crops: int = 0,
                 local_seconds: float = 0.5) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"audio output {output!r} unknown; valid: {', '.join(OUTPUTS)}")
        if views not in VIEWS:
            raise ValueError(f"audio views {views!r} unknown; valid: {', '.join(VIEWS)}")
        if not (0 <= warp_freq < 1 and 0 <= stretch_time < 1):
            raise ValueError(f"audio warp_freq={warp_freq}, stretch_time={stretch_time}: each must lie in [0, 1)")
        if min(shift_frames, freq_masks, time_masks, mask_bins, mask_frames, tilt) < 0:
            raise ValueError("audio shift_frames, freq_masks, time_masks, mask_bins, mask_frames, tilt must be >= 0")
        if seconds <= 0 or hop_length <= 0 or n_mels <= 0:
            raise ValueError(f"audio seconds, hop_length, n_mels must be positive, got "
                             f"{seconds}, {hop_length}, {n_mels}")
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise ValueError(f"audio sample_rate={sample_rate} must lie in {MIN_RATE}-{MAX_RATE} Hz")
        if norm_stats is not None and float(norm_stats[1]) <= 0:
            raise ValueError(f"audio norm_stats {norm_stats!r} must be (mean, std > 0) or None")
        self.sample_rate, self.output, self.hop = int(sample_rate), output, int(hop_length)
        self.samples = int(round(seconds * sample_rate))  # S
        self.frames = self.samples // self.hop  # T
        if self.frames < 1:
            raise ValueError(f"audio crop of {self.samples} samples is shorter than hop_length {hop_length}")
        self.n_mels, self.gain_db, self.noise_std = int(n_mels), float(gain_db), float(noise_std)
        self.rrc_scale = None if rrc_scale is None else float_pair(rrc_scale, "audio rrc_scale")
        self.rrc_virtual = float_pair(rrc_virtual, "audio rrc_virtual")
        self.norm_stats = None if norm_stats is None else (float(norm_stats[0]), float(norm_stats[1]))
        self.views = views
        self.speech: dict[str, Any] = dict(warp_freq=float(warp_freq), stretch_time=float(stretch_time),
                           shift_frames=int(shift_frames), freq_masks=int(freq_masks), time_masks=int(time_masks),
                           mask_bins=int(mask_bins), mask_frames=int(mask_frames), tilt=float(tilt))
        if self.speech["mask_bins"] > self.n_mels or self.speech["shift_frames"] >= self.frames:
            raise ValueError(f"audio mask_bins={mask_bins} must be <= n_mels={n_mels} and shift_frames="
                             f"{shift_frames} below the crop's {self.frames} frames")
        self.max_seconds, self.max_bytes = float(max_seconds), int(max_bytes)
        self.local_crops, self.local_samples = int(local_crops), int(round(local_seconds * sample_rate))
        self.local_frames = self.local_samples // self.hop
        self.check_local_crops(local_seconds)
        import torchaudio

        self.mel = torchaudio.transforms.MelSpectrogram(
            self.sample_rate, n_fft=n_fft, win_length=win_length, hop_length=self.hop, f_min=f_min,
            f_max=f_max, n_mels=self.n_mels)

    def check_local_crops(self, local_seconds: float) -> None:
        """ValueError naming the multi-crop argument that cannot work with the other settings."""
        if self.local_crops < 0:
            raise ValueError(f"audio local_crops={self.local_crops}; give 0 (no local crops) or a positive count")
        if not self.local_crops:
            return
        if self.output != "logmel":
            raise ValueError(f"audio local_crops needs output='logmel' (two views), not output={self.output!r}")
        if self.local_frames < 1 or (self.views == "speech" and self.local_frames <= max(
                self.speech["shift_frames"], self.speech["mask_frames"])):
            raise ValueError(f"audio local_seconds={local_seconds} gives {self.local_frames} frames; it must give "
                             "at least one (with views='speech': more than shift_frames and mask_frames)")

    def decode(self, members: Mapping[str, bytes]) -> np.ndarray:
        """Mono float32 [n] at sample_rate."""
        ext, data = media_member(members, self.extensions, self.name)
        if len(data) > self.max_bytes:
            raise DecodeError(f"audio member .{ext} is {len(data)} bytes, over max_bytes={self.max_bytes}")
        return decode_audio(ext, data, self.sample_rate, self.max_seconds)

    def log_mel(self, waves: np.ndarray) -> np.ndarray:
        """float32 [V, S] → normalized log-mel float32 [V, F, T] (T = S // hop_length)."""
        import torch

        with one_torch_thread():
            power = self.mel(torch.from_numpy(waves)).numpy()[:, :, : waves.shape[1] // self.hop]  # [V, F, T]
        lms = np.log(power + LOG_EPS)
        return np.stack([normalize(x, self.norm_stats) for x in lms]).astype(np.float32, copy=False)

    def crop(self, wave: np.ndarray, rng: np.random.Generator | None, size: int = 0) -> tuple[np.ndarray, int]:
        """A [S] crop (or [size]) and its valid length: random and augmented with rng, centred and clean without."""
        out, length = crop_wave(wave, size or self.samples, rng)
        if rng is not None:
            out = augment_wave(out, length, rng, self.gain_db, self.noise_std)
        return out, length

    def sample(self, decoded: Any, rng: np.random.Generator, train: bool) -> Sample:
        """Two log-mel views, one log-mel, or a waveform with its valid length (see the module doc)."""
        wave, length = self.crop(decoded, rng if train else None)
        if self.output == "wave":
            return {"wave": wave, "length": np.array(length, np.int64)}
        if not train or self.output == "spec":
            return {"spec": self.log_mel(wave[None])[0]}
        other, _ = self.crop(decoded, rng)
        views = self.view_chain(self.log_mel(np.stack([wave, other])), rng)  # [2, F, T]
        out = {"view1": np.ascontiguousarray(views[0]), "view2": np.ascontiguousarray(views[1])}
        if self.local_crops:  # after the global views: those keep their bytes
            waves = np.stack([self.crop(decoded, rng, self.local_samples)[0] for _ in range(self.local_crops)])
            out["local"] = np.stack(self.view_chain(self.log_mel(waves), rng))  # [K, F, T_local]
        return out

    def view_chain(self, views: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Each normalized log-mel [F, T] of views [V, F, T] through the speech chain or the random resize crop."""
        if self.views == "speech":
            # the level of digital silence (zero padding) after normalization; per view without fixed stats
            silence = np.array(np.log(LOG_EPS), np.float32)
            level = float(normalize(silence, self.norm_stats)) if self.norm_stats else None
            return [speech_view(v, rng, silence=float(v.min()) if level is None else level, **self.speech)
                    for v in views]
        if self.rrc_scale is not None:
            return [random_resize_crop(v, rng, self.rrc_virtual, self.rrc_scale, self.rrc_scale) for v in views]
        return list(views)

    def blank(self, train: bool) -> Sample:
        """Zero arrays shaped like `sample`'s."""
        if self.output == "wave":
            return {"wave": np.zeros(self.samples, np.float32), "length": np.array(0, np.int64)}
        z = np.zeros((self.n_mels, self.frames), np.float32)
        if train and self.output == "logmel":
            out = {"view1": z, "view2": z.copy()}
            if self.local_crops:
                out["local"] = np.zeros((self.local_crops, self.n_mels, self.local_frames), np.float32)
            return out
        return {"spec": z}

    def token_grid(self, geometry: Mapping[str, Any]) -> tuple[int, ...]:
        """(frames,) of the conv feature encoder for wave; (F/pf, T/pt) patches for spectrograms."""
        from selfsup.pipeline.masking import grid_from_geometry

        if self.output == "wave":
            return grid_from_geometry((self.samples,), geometry, "wave")
        return grid_from_geometry((self.n_mels, self.frames), geometry, "spec")

    def valid_tokens(self, sample: Sample, geometry: Mapping[str, Any]) -> int:
        """Conv frames of the valid samples for wave; every patch for spectrograms."""
        from selfsup.pipeline.masking import conv_frames

        if self.output == "wave":
            self.token_grid(geometry)  # validates the geometry
            return conv_frames(int(sample["length"]), geometry["conv_layers"])
        return int(np.prod(self.token_grid(geometry)))
