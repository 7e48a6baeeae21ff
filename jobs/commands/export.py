"""`selfsup export CHECKPOINT OUT --format F`: parse the flags, then run the export engine
(selfsup.trainers.export: safetensors, timm, torchscript or onnx files plus config.json, checked numerically).
"""
from __future__ import annotations

import argparse
from typing import Any

from selfsup.jobs.common import add_storage_args, storage_options
from selfsup.pipeline import storage

FORMATS = ("safetensors", "timm", "torchscript", "onnx")  # trainers.export.FORMATS, without importing torch here


def add_parser(sub: Any) -> None:
    """Register `selfsup export`."""
    p = sub.add_parser("export", help="write a checkpoint's encoder as safetensors, timm, TorchScript or ONNX files",
                       description="Export the encoder of CHECKPOINT (a checkpoints/step-N folder, or a run folder: "
                                   "its latest checkpoint) into the folder OUT: the model file of --format and "
                                   "config.json (architecture, input shape, normalization, modality), written last. "
                                   "The export is checked first: the files read back give the encoder's features "
                                   "on a random batch (max |diff| printed); nothing is written when they do not.",
                       epilog="safetensors: selfsup's weight names. timm: timm's names and hub config, "
                              "timm.create_model('local-dir:OUT', pretrained=True) loads it (ResNets and image "
                              "ViTs; ResNet names also load into torchvision's resnet with fc=Identity). "
                              "torchscript: torch.jit.load(OUT/model.torchscript.pt). onnx: OUT/model.onnx, "
                              "dynamic batch; needs pip install 'selfsup[export]'.")
    p.add_argument("path", metavar="CHECKPOINT", help="a checkpoint folder or a run folder (path or URL)")
    p.add_argument("out", metavar="OUT", help="folder to write (path or URL); files there are replaced")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)}")
    add_storage_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, then print the files and the numerical check."""
    from selfsup.trainers.export import export_checkpoint

    done = export_checkpoint(args.path, args.out, args.format, storage_options(args))
    info = done.config["selfsup"]
    for url in done.files:
        print(storage.redact_url(url))
    print(f"{args.format}: {info['backbone']} step {info['step']}, input {info['input']['shape']}, "
          f"features [B, {info['out_dim']}]; max |exported - encoder| = {done.max_abs_diff:.3g} "
          f"on a batch of {info['check']['batch']}")
    return 0
