"""`selfsup export` on checkpoints of real one-step runs: timm-format weights load into timm (and
torchvision) with strict=True and give the encoder's features; safetensors and config.json read without
selfsup; TorchScript and ONNX reproduce the encoder; a `timm:` backbone trains, evaluates and exports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file

from selfsup.jobs.cli import main
from selfsup.pipeline import storage
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import load_encoder
from selfsup.trainers.backbones import backbone_from_spec, make_backbone
from selfsup.trainers.backbones.timm_layout import timm_layout
from selfsup.jobs.commands import export as export_command
from selfsup.trainers.export import FORMATS, TOLERANCE, export_checkpoint, require
from selfsup.trainers.inputs import IMAGENET, eval_sample, normalize_uint8
from tests.conftest import tiny_pretrain

RESNET = """
data: {modality: image, modality_args: {size: 32, channels: 3, recipe: simclr, blur: false}}
objective: {name: simclr, backbone: resnet18, args: {proj_dim: 32}}
train: {steps: 1, ckpt_every: 1}
"""
VIT = """
data: {modality: image, modality_args: {size: 32, channels: 3, recipe: single}}
objective: {name: mae, backbone: vit_micro, backbone_args: {img_size: 32, patch_size: 8},
            args: {decoder_dim: 32, decoder_depth: 1, decoder_heads: 4}}
train: {steps: 3, ckpt_every: 1, keep: 2}
"""
TIMM = """
data: {modality: image, modality_args: {size: 28, channels: 1, recipe: simclr, blur: false}}
objective: {name: simclr, backbone: "timm:resnet18", backbone_args: {in_channels: 1}, args: {proj_dim: 32}}
train: {steps: 1, ckpt_every: 1}
"""


@pytest.fixture(scope="module")
def resnet_run(tiny_fmnist: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_pretrain(tmp_path_factory.mktemp("export") / "resnet", tiny_fmnist, RESNET)


@pytest.fixture(scope="module")
def vit_run(tiny_fmnist: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_pretrain(tmp_path_factory.mktemp("export") / "vit", tiny_fmnist, VIT)


def images(meta: dict, n: int = 4, seed: int = 0) -> torch.Tensor:
    """n random uint8 images of the checkpoint's eval shape, normalized as meta.json says."""
    size, channels = meta["modality_args"]["size"], meta["modality_args"]["channels"]
    x = np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return normalize_uint8(torch.from_numpy(x), meta["mean"], meta["std"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


def test_resnet_weights_load_into_timm_and_torchvision_strictly(resnet_run: str, tmp_path: Path) -> None:
    out = tmp_path / "timm"
    done = export_checkpoint(resnet_run, str(out), "timm")
    assert [Path(u).name for u in done.files] == ["model.safetensors", "config.json"]
    encoder = load_encoder(resnet_run)
    x = images(encoder.selfsup_meta)
    config = json.loads((out / "config.json").read_text())  # plain files: no selfsup below
    state = load_file(str(out / "model.safetensors"))
    net = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    assert config["architecture"] == "resnet18"
    net.load_state_dict(state, strict=True)
    tv = torchvision.models.resnet18()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)
    hub = timm.create_model(f"local-dir:{out}", pretrained=True)
    with torch.no_grad():
        want = encoder(x)
        diffs = {name: max_diff(m.eval()(x), want) for name, m in [("timm", net), ("torchvision", tv), ("hub", hub)]}
    print(f"resnet18 → timm/torchvision/local-dir max |diff|: {diffs}; export check {done.max_abs_diff:.3g}")
    assert max(diffs.values()) < 1e-5 and want.abs().max() > 0.01


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch marks TorchScript deprecated
def test_vit_weights_load_into_timm_strictly_and_trace(vit_run: str, tmp_path: Path) -> None:
    encoder = load_encoder(vit_run)
    x = images(encoder.selfsup_meta)
    export_checkpoint(vit_run, str(tmp_path / "timm"), "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    net = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["model_args"])
    net.load_state_dict(load_file(str(tmp_path / "timm" / "model.safetensors")), strict=True)
    ts = export_checkpoint(vit_run, str(tmp_path / "ts"), "torchscript")
    traced = torch.jit.load(str(tmp_path / "ts" / "model.torchscript.pt"))
    with torch.no_grad():
        want = encoder(x)
        timm_diff, ts_diff = max_diff(net.eval()(x), want), max_diff(traced(x), want)
    print(f"vit_micro → timm max |diff| {timm_diff:.3g}; torchscript {ts_diff:.3g} (export check "
          f"{ts.max_abs_diff:.3g})")
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["embed_dim"] == 128
    assert timm_diff < 1e-5 and ts_diff < 1e-5 and want.abs().max() > 0.01


def test_onnx_export_runs_in_onnxruntime(vit_run: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the `export` extra is not installed")
    done = export_checkpoint(vit_run, str(tmp_path / "onnx"), "onnx")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    encoder = load_encoder(vit_run)
    x = images(encoder.selfsup_meta, n=5)  # another batch size than the one traced
    with torch.no_grad():
        diff = max_diff(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), encoder(x))
    print(f"vit_micro → onnx max |diff| {diff:.3g} (export check {done.max_abs_diff:.3g})")
    assert diff < 1e-4 and done.max_abs_diff <= TOLERANCE


def test_safetensors_and_config_read_without_selfsup(vit_run: str, tmp_path: Path) -> None:
    out = tmp_path / "st"
    export_checkpoint(vit_run, str(out), "safetensors")
    config = json.loads((out / "config.json").read_text())["selfsup"]
    state = load_file(str(out / "model.safetensors"))
    meta = ck.read_meta(ck.latest_checkpoint(vit_run))
    saved = ck.load_torch(storage.join(ck.latest_checkpoint(vit_run), ck.ENCODER))
    assert sorted(state) == sorted(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert (config["backbone"], config["backbone_args"], config["modality"]) == (
        "vit_micro", meta["backbone_args"], "image")
    assert config["input"]["shape"] == ["B", 3, 32, 32] and config["out_dim"] == 128
    assert config["input"]["mean"] == meta["mean"] == list(IMAGENET[0])
    assert config["input"]["std"] == meta["std"] == list(IMAGENET[1])
    assert config["files"] == ["model.safetensors"] and config["step"] == 3


def test_meta_json_records_the_normalization_the_sample_path_applies(vit_run: str) -> None:
    meta = ck.read_meta(ck.latest_checkpoint(vit_run))
    assert meta["mean"] is not None and meta["std"] is not None
    sample = eval_sample("image", meta["modality_args"])["image"][None]  # [1, H, W, C] uint8
    sample = torch.from_numpy(np.random.default_rng(0).integers(0, 256, sample.shape, dtype=np.uint8))
    # data.mean/std unset: the loop normalized with the defaults; meta.json's values give the same bytes
    assert torch.equal(normalize_uint8(sample, meta["mean"], meta["std"]), normalize_uint8(sample, None, None))


def test_a_run_without_an_evaluator_keeps_a_bounded_number_of_checkpoints(vit_run: str) -> None:
    """Three checkpoints, keep 2, nothing evaluates them: the default prunes the oldest."""
    assert [s for s, _ in ck.list_checkpoints(vit_run)] == [2, 3]


def test_a_timm_backbone_trains_evaluates_and_exports(tiny_fmnist: str, tmp_path: Path) -> None:
    run = tiny_pretrain(tmp_path / "timm-run", tiny_fmnist, TIMM)
    meta = ck.read_meta(ck.latest_checkpoint(run))
    assert meta["backbone"] == "timm:resnet18" and meta["mean"] == [0.5] and meta["std"] == [0.25]
    assert main(["evaluate", run, "--eval-set", f"fm={tiny_fmnist}", "--no-ray", "--methods", "knn",
                 "--no-baselines", "--batch-size", "20", "--quiet"]) == 0
    assert ck.is_evaluated(ck.latest_checkpoint(run))
    out = tmp_path / "out"
    assert main(["export", run, str(out), "--format", "timm"]) == 0
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    net.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = images(meta)
    with torch.no_grad():
        assert max_diff(net.eval()(x), load_encoder(run)(x)) < 1e-5


def test_a_local_weights_file_initialises_a_timm_backbone(tmp_path: Path) -> None:
    """timm-named weights with a classifier (as published) load into the headless model; nothing downloads."""
    source = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    built = make_backbone("timm:resnet18", weights=str(path))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in built.net.state_dict().items())
    with pytest.raises(ValueError, match=rf"weights={path} does not fit timm model ResNet \(missing: layer1.2"):
        make_backbone("timm:resnet34", weights=str(path))
    # a checkpoint's architecture never reads the file again (its weights come from encoder.pt)
    spec = {"backbone": "timm:resnet18", "backbone_args": {"weights": str(tmp_path / "gone.safetensors")}}
    assert backbone_from_spec(spec).out_dim == 512


@pytest.mark.parametrize("backbone,args,modality,message", [
    ("resnet18", {"small_input": True}, "image", "timm cannot take resnet18 with small_input=true"),
    ("convnet_small", {"width": 4}, "image", "timm cannot take backbone 'convnet_small'"),
    ("vit_micro", {"modality": "audio", "n_mels": 16, "frames": 16, "patch_size": 8}, "audio",
     "timm cannot take vit_micro over audio tokens"),
])
def test_architectures_timm_cannot_take_are_refused(backbone: str, args: dict, modality: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        timm_layout(make_backbone(backbone, **args), backbone, args, modality)


def test_bad_names_are_refused(vit_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", vit_run, str(tmp_path / "x"), "--format", "keras"]) == 2
    assert "unknown export format 'keras'; valid: onnx, safetensors, timm, torchscript" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert set(export_command.FORMATS) == set(FORMATS.names())  # the help lists what the engine has
    with pytest.raises(ValueError, match="unknown timm model 'resnet1'; close: resnet18"):
        make_backbone("timm:resnet1")


def test_a_missing_onnx_dependency_names_the_extra_to_install() -> None:
    require("onnx")  # installed by the `export` extra (make test installs it)
    with pytest.raises(ValueError, match=r"--format onnx needs selfsup_absent_module \(not installed\): "
                                         r"pip install 'selfsup\[export\]'"):
        require("onnx", "selfsup_absent_module")
