"""The loaders `selfsup bench pipeline` compares against: webdataset + DataLoader, Ray Data, torchvision defaults.

`ModalityTransform` calls the modality's own decode and views, so the `dataloader` and
`ray_data` variants do the same work per sample as the ShardStreams and differ only in how
they move data. The `*Default` transforms write the same recipe the way it is commonly written
with tensors (torchvision.transforms.v2, torchaudio), to show what the modality code buys.
Nothing here unpickles: tar members stay raw bytes until the modality decodes them.
`start_ray` brings up the local Ray instance both Ray-based variants share; `RunClock` times a
run and tells how many cores it got and how many other programs took meanwhile.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from selfsup.pipeline.modalities import Modality, make_modality
from selfsup.pipeline.modalities.audio import AudioModality
from selfsup.pipeline.modalities.image import ImageModality, blur_kernel
from selfsup.pipeline.modalities.video import VideoModality
from selfsup.pipeline.seeding import sample_rng


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


def wait_cpus_free(cpus: int, timeout: float = 20.0) -> None:
    """Wait until actors killed by the previous run have given their CPUs back to Ray."""
    import ray

    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.05)


def start_ray(workdir: Path, cpus: int) -> Optional[Path]:
    """A local Ray instance on 127.0.0.1 with `cpus` CPUs; temp files under the workdir (short path).

    Returns the temp dir when it had to be made elsewhere (the caller removes it).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray starts workers at nice 15; at that weight they lose the CPU to any other busy process,
    # while the DataLoader variants run at 0. Equal footing: the streams run at nice 0 too.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    temp, made = (workdir / "ray").resolve(), None
    if len(str(temp)) > 60:  # Unix socket paths under it must stay below 108 characters
        temp = made = Path(tempfile.mkdtemp(prefix="selfsup-ray-"))
    temp.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp),
             log_to_driver=False, configure_logging=False)
    return made


def wds_loader(paths: list[str], transform: Callable[[Mapping[str, Any]], Any], batch_size: int,
               workers: int) -> Iterable[Any]:
    """DataLoader(num_workers) over shard list → split by worker → tar samples → transform."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    pipe = wds.DataPipeline(wds.SimpleShardList(paths), wds.split_by_worker, wds.tarfile_to_samples(),
                            wds.map(transform))
    return DataLoader(pipe, batch_size=batch_size, num_workers=workers, worker_init_fn=one_thread)


def time_loader(loader: Iterable[Mapping[str, Any]], clock: RunClock) -> int:
    """Samples in one pass over a loader (workers start inside the clock); batches have a `key` column."""
    n = 0
    clock.start()
    for batch in loader:
        n += len(batch["key"])
    clock.stop()
    return n


def ray_data_run(paths: list[str], transform: ModalityTransform, batch_size: int, clock: RunClock) -> int:
    """Samples of read_webdataset (raw bytes) → map_batches(the modality's views) → iter_batches."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    clock.start()
    ds = ray.data.read_webdataset(paths, decoder=None).map_batches(
        transform.batch, batch_size=batch_size, batch_format="numpy")
    n = 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(batch["key"])
    clock.stop()
    return n


class RunClock:
    """Wall time of a timed region, the CPU this process tree spent in it, and what other programs took.

    The tree is this process and its descendants (DataLoader workers, raylet and Ray workers);
    other programs' share is the machine's busy time minus ours (Linux /proc; 0 elsewhere). On a
    shared machine a parallel variant gets fewer than N cores, which lowers `efficiency` without
    any fault of its own; samples per CPU-second do not depend on that share.
    """

    def __init__(self, tree: bool = True) -> None:
        self.tree = tree  # False: count this process alone (a variant run in it; Ray's idle processes are not its)
        self.wall = self.cpu = self.other = 0.0
        self.per_pid: dict[int, float] = {}  # CPU seconds of each process of the tree in the region
        self._t0, self._busy, self._ours = 0.0, 0.0, {}  # type: tuple[float, float, dict[int, float]]

    def start(self) -> None:
        """Start timing (the /proc walk is done before the clock starts)."""
        self._busy, self._ours = self.sample(self.tree)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Stop timing; returns the wall seconds."""
        self.wall = time.perf_counter() - self._t0
        busy, ours = self.sample(self.tree)
        # processes that ended meanwhile drop out (their time is lost unless a parent reaped it)
        self.per_pid = {pid: t - self._ours.get(pid, 0.0) for pid, t in ours.items()}
        self.cpu = sum(self.per_pid.values())
        self.other = max(0.0, busy - self._busy - self.cpu)
        return self.wall

    def figures(self) -> dict[str, float]:
        """Cores this tree used and cores other programs used, on average over the region."""
        wall = self.wall or float("inf")
        return {"cores": self.cpu / wall, "other_cores": self.other / wall}

    @staticmethod
    def sample(tree: bool = True) -> tuple[float, dict[int, float]]:
        """(seconds the machine has been busy, {pid: CPU seconds} of this process tree, or of this process)."""
        busy, children, seconds = proc_table()
        if not tree:
            return busy, {os.getpid(): seconds.get(os.getpid(), 0.0)}
        return busy, process_tree(os.getpid(), children, seconds)


def proc_table() -> tuple[float, dict[int, list[int]], dict[int, float]]:
    """(seconds the machine has been busy, {pid: child pids}, {pid: CPU seconds incl. reaped children})
    from Linux /proc; (0, {}, {}) elsewhere."""
    hz = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                    children.setdefault(int(fields[1]), []).append(int(entry))
                    ticks[int(entry)] = sum(map(int, fields[11:15]))  # utime stime cutime cstime
    except OSError:
        return 0.0, {}, {}
    return (user + nice + system + irq + softirq + steal) / hz, children, {p: t / hz for p, t in ticks.items()}


def process_tree(root: int, children: dict[int, list[int]], seconds: dict[int, float]) -> dict[int, float]:
    """{pid: CPU seconds} of `root` and its descendants, from a `proc_table()` reading."""
    ours, todo = {}, [root]
    while todo:
        pid = todo.pop()
        ours[pid] = seconds.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return ours


# ---------------------------------------------------------------- "common default" recipes on tensors


def default_transform(modality: str, args: Mapping[str, Any]) -> Optional[Callable[[Mapping[str, Any]], Any]]:
    """The recipe written the common way with tensors for this modality, or None if there is none."""
    classes: dict[str, Callable[[Mapping[str, Any]], Callable[[Mapping[str, Any]], Any]]] = {
        "image": ImageTVDefault, "audio": AudioTorchDefault, "video": VideoTVDefault}
    return classes[modality](args) if modality in classes else None


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

            m = ImageModality(**self.args)
            kernel = blur_kernel(m.size)  # the modality's
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
    """soundfile → torchaudio resample → per view: crop, gain, MelSpectrogram, log, BYOL-A crop (F.interpolate)."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = dict(args)
        self._m: Optional[AudioModality] = None

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        import soundfile
        import torch

        m = self._m = self._m or AudioModality(**self.args)
        x, rate = soundfile.read(io.BytesIO(_media(sample, ("wav", "flac"))), dtype="float32", always_2d=True)
        wave = torch.from_numpy(x.mean(axis=1))
        if rate != m.sample_rate:
            from selfsup.pipeline.modalities.audio import resampler

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
        self._m: Optional[VideoModality] = None
        self._tf: Any = None

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        from torchvision.transforms import v2

        m = self._m = self._m or VideoModality(**self.args)
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

        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            rate, tb = stream.average_rate, stream.time_base
            if rate is None or tb is None:
                raise ValueError("video stream has no average rate or time base")
            fps = float(rate)
            total = int(stream.frames) or int(float((stream.duration or 0) * tb) * fps)
            span = (m.frames - 1) * m.stride + 1
            first = int(torch.randint(0, max(1, total - span + 1), ()))
            last = first + span - 1
            start_pts = int(stream.start_time or 0)
            container.seek(start_pts + int(first / fps / tb), stream=stream, backward=True)
            frames: dict[int, np.ndarray] = {}
            for frame in container.decode(stream):
                if frame.pts is None:  # no timestamp: cannot be placed in the clip
                    continue
                index = int(round(float((frame.pts - start_pts) * tb) * fps))
                if index > last:
                    break
                if index >= first:
                    frames[index] = frame.to_ndarray(format="rgb24")  # read_video converts every frame
        keep = sorted(frames)
        picks = [frames[max([k for k in keep if k <= first + s * m.stride] or keep[:1])]
                 for s in range(m.frames)]
        return tv_tensors.Video(torch.from_numpy(np.stack(picks)).permute(0, 3, 1, 2))
