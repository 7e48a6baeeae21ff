"""Finding the demo and test data: --data, $SELFSUP_DATA, /usr/share/datasets, ../shared/datasets (docs/data.md)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# dataset → (sub-folders to try under each root, how to get it)
DATASETS = {
    "fashion-mnist": (("fashion-mnist",),
                      "`apt-get install dataset-fashion-mnist` (Debian) or download the four IDX files "
                      "from github.com/zalandoresearch/fashion-mnist into DATA/fashion-mnist/"),
    "fsdd": (("fsdd/recordings", "free-spoken-digit-dataset/recordings", "fsdd", "recordings"),
             "`git clone https://github.com/Jakobovski/free-spoken-digit-dataset` and pass "
             "--data pointing at the folder holding it"),
    "video": (("video",), "put video files (e.g. OpenCV's samples vtest.avi, tree.avi from Debian's "
                          "opencv-doc) into DATA/video/"),
    "photos": (("photos",), "put real photographs (JPEG, ideally a few hundred of ImageNet-like size) "
                            "into DATA/photos/, or pass --data pointing at such a folder"),
    "timgm6mb": (("sf2", "timgm6mb"), "`apt-get install timgm6mb-soundfont` (Debian; installs "
                                      "/usr/share/sounds/sf2/TimGM6mb.sf2) or put TimGM6mb.sf2 into DATA/sf2/"),
}
SYSTEM_PLACES = {"timgm6mb": (Path("/usr/share/sounds/sf2"),)}  # where Debian installs it; tried after the roots
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist", "timgm6mb": "timgm6mb-soundfont"}
SOUNDFONT_FILE = "TimGM6mb.sf2"  # the instrument-family probe set's font, inside the timgm6mb folder
# the unlabeled general-audio corpus (docs/data.md): (Debian package, file or folder it installs, source type)
GENERAL_AUDIO = (
    ("opl3-soundfont", "/usr/share/sounds/sf2/OPL-3_FM_128M.sf2", "soundfont"),
    ("colobot-common-sounds", "/usr/share/games/colobot", "audio-clips"),
    ("extremetuxracer-data", "/usr/share/games/etr", "audio-clips"),
    ("frozen-bubble-data", "/usr/share/games/frozen-bubble/snd", "audio-clips"),
    ("lincity-ng-data", "/usr/share/games/lincity-ng", "audio-clips"),
    ("tuxpaint-data", "/usr/share/tuxpaint/sounds", "audio-clips"),
    ("sound-theme-freedesktop", "/usr/share/sounds/freedesktop", "audio-clips"),
)
# never used for training, tuning or evaluation here: kept for independent checks (docs/data.md)
RESERVED_SOUNDFONTS = ("fluid-soundfont-gm", "fluid-soundfont-gs", "fluidr3mono-gm-soundfont",
                       "musescore-general-soundfont")


def data_roots(data: Optional[str] = None) -> list[Path]:
    """Where datasets are looked up, in order."""
    roots = []
    if data:
        roots.append(Path(data).expanduser())
    if os.environ.get("SELFSUP_DATA"):
        roots.append(Path(os.environ["SELFSUP_DATA"]).expanduser())
    roots.append(Path("/usr/share/datasets"))
    roots.append(Path.cwd().parent / "shared" / "datasets")
    roots.append(PROJECT_ROOT.parent / "shared" / "datasets")
    seen, out = set(), []
    for r in roots:
        key = str(r.resolve()) if r.exists() else str(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _looks_right(name: str, path: Path) -> bool:
    if name == "fashion-mnist":
        return any(path.glob("train-images-idx3-ubyte*")) or any(path.glob("t10k-images-idx3-ubyte*"))
    if name == "fsdd":
        return any(path.glob("*_*_*.wav"))
    if name == "timgm6mb":
        return (path / SOUNDFONT_FILE).is_file()
    if name == "photos":
        return any(p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") for p in path.glob("*"))
    return any(p.suffix.lower() in (".avi", ".mp4", ".mkv", ".webm", ".mov") for p in path.glob("*"))


def find_dataset(name: str, data: Optional[str] = None) -> Optional[Path]:
    """The folder holding dataset `name`, or None. `data` may be the dataset folder itself."""
    subs, _ = DATASETS[name]
    for root in data_roots(data):
        for candidate in (root, *[root / s for s in subs]):
            if candidate.is_dir() and _looks_right(name, candidate):
                return candidate
    return next((p for p in SYSTEM_PLACES.get(name, ()) if p.is_dir() and _looks_right(name, p)), None)


def missing_line(name: str, data: Optional[str] = None) -> str:
    """One line saying that a dataset was not found, where we looked, and how to get it."""
    _, how = DATASETS[name]
    looked = ", ".join(str(r) for r in data_roots(data))
    return f"skipping {name}: not found under {looked}; to get it: {how}"


def general_audio_parts() -> list[tuple[str, str]]:
    """(path, source type) of the general-audio corpus parts installed here (docs/data.md)."""
    return [(path, kind) for _, path, kind in GENERAL_AUDIO if os.path.exists(path)]


def install_missing(general_audio: bool = False) -> None:
    """Install the Debian packages of the data sets nothing else provides (Fashion-MNIST, TimGM6mb), and with
    `general_audio` those of the general-audio corpus (about 300 MB), when apt is usable."""
    import shutil
    import subprocess

    packages = [pkg for name, pkg in DEBIAN_PACKAGES.items() if find_dataset(name) is None]
    if general_audio:
        packages += [pkg for pkg, path, _ in GENERAL_AUDIO if not os.path.exists(path)]
    if not packages:
        return
    if not (shutil.which("apt-get") and os.geteuid() == 0):
        print(f"not installing Debian's {' '.join(packages)}: needs apt-get and root; the tests reaching them skip")
        return
    print(f"installing Debian's {' '.join(packages)} ...")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, check=False).returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], check=False)
        if subprocess.run(install, check=False).returncode != 0:
            print(f"could not install {' '.join(packages)}; the tests and demos reaching them skip with a line")


def main() -> None:
    """`python -m selfsup.jobs.data [--install-missing] [--install-general-audio]`: say which data sets were found."""
    import sys

    if "--install-missing" in sys.argv or "--install-general-audio" in sys.argv:
        install_missing(general_audio="--install-general-audio" in sys.argv)
    for name in DATASETS:
        path = find_dataset(name)
        print(f"{name}: {path}" if path else missing_line(name))
    parts = general_audio_parts()
    print(f"general-audio: {len(parts)} of {len(GENERAL_AUDIO)} parts installed"
          + ("" if len(parts) == len(GENERAL_AUDIO) else " (python -m selfsup.jobs.data --install-general-audio)"))


if __name__ == "__main__":
    main()
