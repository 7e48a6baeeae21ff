"""Configs by name, and storage options from the command line for `pretrain` and `retrain`: a run on
moto S3 whose credentials come only from --storage-option / $SELFSUP_STORAGE_OPTIONS and land in none
of its files."""
from __future__ import annotations

import json

import pytest

from selfsup.jobs.cli import build_parser, main
from selfsup.jobs.common import CONFIGS, bundled_configs, config_location
from selfsup.pipeline import storage
from selfsup.pipeline.clients import forget_clients
from selfsup.trainers import run_folder as rf
from tests.conftest import FMNIST

KEY_ID, SECRET = "AKIAPLANTEDBYTEST001", "plantedSecret/0123456789abcdefABCDEF01234"  # AWS-shaped, 20 and 40


def test_a_bundled_config_is_found_by_name_and_an_unknown_name_lists_them(capsys):
    names = bundled_configs()
    assert {"simclr_image", "wav2vec2_audio", "quality/image"} <= set(names)
    assert config_location("simclr_image") == str(CONFIGS / "simclr_image.yaml")
    assert config_location("runs/x.yaml") == "runs/x.yaml"  # a path stays a path, found or not
    assert main(["pretrain", "simclr_imag", "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "config 'simclr_imag' is neither a YAML file nor a bundled config" in err and "simclr_image" in err
    for command in ("pretrain", "retrain"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "mae_video" in capsys.readouterr().out.replace("\n", " ")


def objects(bucket: str) -> dict[str, bytes]:
    """Every object of a bucket (read with the test's own credentials), by key."""
    import boto3

    client = boto3.client("s3", aws_access_key_id="reader", aws_secret_access_key="reader-secret")
    name = bucket.split("://", 1)[1]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=name).get("Contents", [])]
    return {k: client.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


def test_pretrain_and_retrain_take_storage_credentials_only_from_their_flags(moto_s3, monkeypatch, capfd, request):
    data = moto_s3.bucket("creds-data") + "/fm"
    assert main(["shards", "write", str(FMNIST), data, "--modality", "image", "--limit", "64",
                 "--samples-per-shard", "32", "--workers", "1", "--quiet"]) == 0
    runs = moto_s3.bucket("creds-runs")
    storage.write_bytes(f"{runs}/simclr.yaml", (CONFIGS / "simclr_image.yaml").read_bytes())  # a config by URL
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    forget_clients()  # clients made with the environment's credentials
    request.addfinalizer(forget_clients)  # and the credential-less ones made here
    with pytest.raises(Exception, match="credentials"):  # nothing else would let the runs reach S3
        storage.listdir(data)
    args = [f"run={runs}/a", f"data.sources=[{{url: {data}}}]", "data.batch_size=16", "data.backend=inline",
            "train.steps=2", "train.log_every=1", "train.warmup_steps=1", "train.ckpt_every=2",
            "objective.backbone_args.width=8"]
    flags = ["--storage-option", f"key={KEY_ID}", "--storage-option", f"secret={SECRET}"]
    assert main(["pretrain", "simclr_image", *args, *flags, "--no-ray", "--quiet"]) == 0
    assert rf.read_status(f"{runs}/a", {"key": KEY_ID, "secret": SECRET}).state == rf.FINISHED

    monkeypatch.setenv("SELFSUP_STORAGE_OPTIONS", json.dumps({"key": KEY_ID, "secret": SECRET}))
    assert main(["retrain", f"{runs}/simclr.yaml", *args, f"retrain.runs={runs}/retrain", "--min-new-samples", "100000",
                 "--no-ray", "--quiet"]) == 0
    written = objects(runs)
    assert any(k.startswith("a/checkpoints/step-000002/") for k in written)
    assert any(k.startswith("retrain/retrain-log.jsonl") for k in written)
    assert not [k for k, body in written.items() if KEY_ID.encode() in body or SECRET.encode() in body]
    out, err = capfd.readouterr()
    assert KEY_ID not in out + err and SECRET not in out + err
