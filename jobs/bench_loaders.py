"""The loaders `selfsup bench pipeline` compares against: webdataset + DataLoader, Ray Data, torchvision defaults.

`ModalityTransform` calls the modality's own decode and views, so the `dataloader` and
`ray_data` variants do the same work per sample as the ShardStreams and differ only in how
they move data. The `*Default` transforms write the same recipe the way it is commonly written
with tensors (torchvision.transforms.v2, torchaudio), to show what the modality code buys.
Nothing here unpickles: tar members stay raw bytes until the modality decodes them.
"""
from __future__ import annotations

import functools
import io
import json
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from pipeline.modalities import Modality, make_modality
from pipeline.seeding import sample_rng


def one_thread(_: Any = None) -> None:
    """One OpenCV and one torch thread in this process (a DataLoader worker_init_fn)."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


@functools.lru_cache(maxsize=4)
def _modality(name: str, args_json: str) -> Modality:
    return make_modality(name, **json.loads(args_json))


class ModalityTransform:
    """A webdataset sample (`__key__`, `__url__`, raw members) → the modality's train views + key."""

    def __init__(self, modality: str, args: Mapping[str, Any], seed: int = 0) -> None:
        self.name, self.args_json, self.seed = modality, json.dumps(dict(args), sort_keys=True), seed

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        modality = _modality(self.name, self.args_json)
        members = {k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
        rng = sample_rng(self.seed, 0, str(sample["__url__"]), str(sample["__key__"]))
        return {**modality.sample(modality.decode(members), rng, True), "key": str(sample["__key__"])}

    def batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data map_batches: a dict of columns → a dict of stacked view arrays."""
        keys = batch["__key__"]
        rows = [self({c: batch[c][i] for c in batch}) for i in range(len(keys))]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def wds_loader(paths: list[str], transform: Callable[[Mapping[str, Any]], Any], batch_size: int,
               workers: int) -> Iterable[Any]:
    """DataLoader(num_workers) over shard list → split by worker → tar samples → transform."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    pipe = wds.DataPipeline(wds.SimpleShardList(paths), wds.split_by_worker, wds.tarfile_to_samples(),
                            wds.map(transform))
    return DataLoader(pipe, batch_size=batch_size, num_workers=workers, worker_init_fn=one_thread)


def time_loader(loader: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
    """(samples, seconds) to iterate a loader once; every batch has a `key` list or array."""
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["key"])
    return n, time.perf_counter() - t0


def ray_data_run(paths: list[str], transform: ModalityTransform, batch_size: int) -> tuple[int, float]:
    """(samples, seconds): read_webdataset (raw bytes) → map_batches(the modality's views) → iter_batches."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    t0 = time.perf_counter()
    ds = ray.data.read_webdataset(paths, decoder=None).map_batches(
        transform.batch, batch_size=batch_size, batch_format="numpy")
    n = 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(batch["key"])
    return n, time.perf_counter() - t0


# ---------------------------------------------------------------- "common default" recipes on tensors


def default_transform(modality: str, args: Mapping[str, Any]) -> Optional[Callable[[Mapping[str, Any]], Any]]:
    """The recipe written the common way with tensors for this modality, or None if there is none."""
    cls = {"image": ImageTVDefault, "audio": AudioTorchDefault, "video": VideoTVDefault}.get(modality)
    return cls(args) if cls else None


def _media(sample: Mapping[str, Any], extensions: tuple[str, ...]) -> bytes:
    return next(sample[e] for e in extensions if e in sample)


class ImageTVDefault:
    """torchvision.io.decode_image at full size, then the SimCLR/BYOL views in transforms.v2 on uint8 tensors."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = dict(args)
        self._views: Optional[list[Callable[[Any], Any]]] = None

    def views(self) -> list[Callable[[Any], Any]]:
        """One v2.Compose per view, built from the modality's own recipe parameters."""
        if self._views is None:
            from torchvision.transforms import v2

            m = make_modality("image", **self.args)
            kernel = max(3, int(0.1 * m.size) | 1)  # as the modality's gaussian_blur
            self._views = []
            for blur_p, solarize_p in m.view_probs:
                ops = [v2.RandomResizedCrop(m.size, scale=m.scale, antialias=True), v2.RandomHorizontalFlip(),
                       v2.RandomApply([v2.ColorJitter(*m.jitter)], p=m.jitter_p), v2.RandomGrayscale(m.gray_p)]
                if m.blur and blur_p:
                    ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
                if solarize_p:
                    ops.append(v2.RandomSolarize(128, p=solarize_p))
                self._views.append(v2.Compose(ops))
        return self._views

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        import torch
        from torchvision.io import ImageReadMode, decode_image

        data = _media(sample, ("jpg", "jpeg", "png", "webp"))
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)  # [3, H, W]
        out = {f"view{i + 1}": view(img) for i, view in enumerate(self.views())}
        return {**out, "key": str(sample["__key__"])}


class AudioTorchDefault:
    """soundfile → torchaudio resample → per view: random crop, gain, MelSpectrogram, log, BYOL-A crop (F.interpolate)."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = dict(args)
        self._m: Any = None

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        import soundfile
        import torch

        m = self._m = self._m or make_modality("audio", **self.args)
        x, rate = soundfile.read(io.BytesIO(_media(sample, ("wav", "flac"))), dtype="float32", always_2d=True)
        wave = torch.from_numpy(x.mean(axis=1))
        if rate != m.sample_rate:
            from pipeline.modalities.audio import resampler

            wave = resampler(rate, m.sample_rate)(wave)
        views = [self.view(m, wave) for _ in range(2)]
        return {"view1": views[0], "view2": views[1], "key": str(sample["__key__"])}

    @staticmethod
    def view(m: Any, wave: Any) -> Any:
        """One log-mel view float32 [F, T]."""
        import torch
        import torch.nn.functional as F

        n, size = len(wave), m.samples
        if n >= size:
            start = int(torch.randint(0, n - size + 1, ()))
            crop = wave[start: start + size]
        else:
            crop = F.pad(wave, (0, size - n))
        crop = crop * 10.0 ** (float(torch.empty(()).uniform_(-m.gain_db, m.gain_db)) / 20.0)
        lms = (m.mel(crop)[:, : m.frames] + 1e-6).log()  # [F, T]
        lms = (lms - m.norm_stats[0]) / m.norm_stats[1]
        if m.rrc_scale is None:
            return lms
        f, t = lms.shape
        ch, cw = int(f * m.rrc_virtual[0]), int(t * m.rrc_virtual[1])
        canvas = torch.zeros(ch, cw)
        canvas[(ch - f) // 2: (ch - f) // 2 + f, (cw - t) // 2: (cw - t) // 2 + t] = lms
        h = min(max(int(float(torch.empty(()).uniform_(*m.rrc_scale)) * f), 1), ch)
        w = min(max(int(float(torch.empty(()).uniform_(*m.rrc_scale)) * t), 1), cw)
        i, j = int(torch.randint(0, ch - h + 1, ())), int(torch.randint(0, cw - w + 1, ()))
        crop2d = canvas[i: i + h, j: j + w][None, None]
        return F.interpolate(crop2d, size=(f, t), mode="bilinear", align_corners=True)[0, 0]


class VideoTVDefault:
    """PyAV decodes every frame of the clip's time span to full-size RGB (as torchvision.io.read_video),
    then transforms.v2 crops, flips, jitters and grays the clip tensor [T, C, H, W]."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = dict(args)
        self._m: Any = None
        self._tf: Any = None

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        from torchvision.transforms import v2

        m = self._m = self._m or make_modality("video", **self.args)
        if self._tf is None:
            self._tf = v2.Compose([
                v2.RandomResizedCrop(m.size, scale=m.scale, antialias=True), v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(brightness=m.jitter[0], contrast=m.jitter[1])], p=m.jitter_p),
                v2.RandomGrayscale(m.gray_p)])
        data = _media(sample, m.extensions)
        views = [self._tf(self.clip(m, data)) for _ in range(2)]
        return {"view1": views[0], "view2": views[1], "key": str(sample["__key__"])}

    @staticmethod
    def clip(m: Any, data: bytes) -> Any:
        """A random clip as a tv_tensors.Video uint8 [T, 3, H, W] at the file's full size."""
        import av
        import torch
        from torchvision import tv_tensors

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            fps, tb = float(stream.average_rate), stream.time_base
            total = int(stream.frames) or int(float(stream.duration * tb) * fps)
            span = (m.frames - 1) * m.stride + 1
            first = int(torch.randint(0, max(1, total - span + 1), ()))
            last = first + span - 1
            start_pts = int(stream.start_time or 0)
            container.seek(start_pts + int(first / fps / tb), stream=stream, backward=True)
            frames: dict[int, np.ndarray] = {}
            for frame in container.decode(stream):
                index = int(round(float((frame.pts - start_pts) * tb) * fps))
                if index > last:
                    break
                if index >= first:
                    frames[index] = frame.to_ndarray(format="rgb24")  # read_video converts every frame
        keep = sorted(frames)
        picks = [frames[max([k for k in keep if k <= first + s * m.stride] or keep[:1])]
                 for s in range(m.frames)]
        return tv_tensors.Video(torch.from_numpy(np.stack(picks)).permute(0, 3, 1, 2))
