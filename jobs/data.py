"""Finding the demo and test data: --data, $SELFSUP_DATA, /usr/share/datasets, ../shared/datasets."""
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
}


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
    return None


def missing_line(name: str, data: Optional[str] = None) -> str:
    """One line saying that a dataset was not found, where we looked, and how to get it."""
    _, how = DATASETS[name]
    looked = ", ".join(str(r) for r in data_roots(data))
    return f"skipping {name}: not found under {looked}; to get it: {how}"


def install_missing() -> None:
    """Install Debian's Fashion-MNIST package when nothing else provides it and apt is usable."""
    import shutil
    import subprocess

    if find_dataset("fashion-mnist") is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("Fashion-MNIST not found; installing Debian's dataset-fashion-mnist ...")
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False)


def main() -> None:
    """`python -m selfsup.jobs.data [--install-missing]`: say which demo datasets were found."""
    import sys

    if "--install-missing" in sys.argv:
        install_missing()
    for name in DATASETS:
        path = find_dataset(name)
        print(f"{name}: {path}" if path else missing_line(name))


if __name__ == "__main__":
    main()
