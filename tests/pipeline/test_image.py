"""Image multi-crop views: the local crops' shapes, dtypes and seeding, and the default output unchanged."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from selfsup.pipeline.modalities import make_modality

# sha256[:16] of view1/view2 (or image) for seeds 0..3, made by the code before multi-crop existed
# (the same pinned OpenCV): recipes that do not ask for local crops keep their bytes. (3, simclr) and
# (3, byol) were re-pinned when `resize` took 2x area halvings instead of one INTER_AREA (issue 22): a
# box over twice the view side is resampled differently (test_image_ops.py bounds the difference).
BEFORE_MULTICROP = {(1, "simclr"): "0b91d924f235e02d", (1, "byol"): "43593dbf89ea2aea",
                    (1, "single"): "b725d9aa527d1841", (3, "simclr"): "27fd7f9669068b2c",
                    (3, "byol"): "c2436f3eb6bdd976", (3, "single"): "ddf1747c83a85b90"}


def picture(channels: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (40, 36, channels), dtype=np.uint8)


def views(seed: int, channels: int = 3, **args: Any) -> dict[str, np.ndarray]:
    modality = make_modality("image", **{"size": 16, "channels": channels, **args})
    return modality.sample(picture(channels), np.random.default_rng(seed), True)


@pytest.mark.parametrize("channels, recipe", sorted(BEFORE_MULTICROP))
def test_default_arguments_make_the_same_bytes_as_before_multicrop(channels: int, recipe: str) -> None:
    h = hashlib.sha256()
    for seed in range(4):
        sample = views(seed, channels, recipe=recipe)
        assert "local" not in sample
        for k in sorted(sample):
            h.update(k.encode())
            h.update(sample[k].tobytes())
    assert h.hexdigest()[:16] == BEFORE_MULTICROP[(channels, recipe)]


@pytest.mark.parametrize("channels, recipe", [(3, "simclr"), (1, "byol")])
def test_local_crops_shape_dtype_seeding_and_the_global_views_untouched(channels: int, recipe: str) -> None:
    args = {"recipe": recipe, "local_crops": 3, "local_size": 8, "local_scale": (0.1, 0.4)}
    a, again, other = views(5, channels, **args), views(5, channels, **args), views(6, channels, **args)
    plain = views(5, channels, recipe=recipe)
    assert sorted(a) == ["local", "view1", "view2"]
    assert a["local"].shape == (3, 8, 8, channels) and a["local"].dtype == np.uint8
    assert a["local"].flags.c_contiguous
    for k in ("view1", "view2"):  # drawn first from the same rng: the same bytes as without local crops
        assert a[k].tobytes() == plain[k].tobytes()
    assert all(a[k].tobytes() == again[k].tobytes() for k in a)  # same seed, same bytes
    assert a["local"].tobytes() != other["local"].tobytes()  # another key's seed, other crops
    assert len({a["local"][i].tobytes() for i in range(3)}) == 3  # each crop drawn anew
    blank = make_modality("image", size=16, channels=channels, **args).blank(True)
    assert {k: (v.shape, v.dtype) for k, v in blank.items()} == {k: (v.shape, v.dtype) for k, v in a.items()}
    assert not blank["local"].any()


def test_eval_and_the_default_blank_have_no_local_crops() -> None:
    modality = make_modality("image", size=16, local_crops=2, local_size=8)
    assert sorted(modality.sample(picture(3), np.random.default_rng(0), False)) == ["image"]
    assert sorted(modality.blank(False)) == ["image"]
    assert sorted(make_modality("image", size=16).blank(True)) == ["view1", "view2"]


@pytest.mark.parametrize("args, named", [
    ({"local_crops": -1}, "local_crops=-1"),
    ({"local_crops": 2, "local_size": 0}, "local_size=0"),
    ({"local_crops": 2, "local_scale": (0.5, 0.2)}, "local_scale"),
    ({"local_crops": 2, "local_scale": (0.0, 0.2)}, "local_scale"),
    ({"local_crops": 2, "local_scale": (0.1,)}, "local_scale"),
    ({"local_crops": 2, "recipe": "single"}, "local_crops needs a two-view recipe"),
])
def test_invalid_multicrop_arguments_raise_naming_them(args: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        make_modality("image", **args)
