"""Secrets: filtered by name pattern at any depth and by value shape, in configs and in messages."""
from __future__ import annotations

import json

import yaml

from selfsup.pipeline import storage
from selfsup.pipeline.config import from_dict, to_dict, to_yaml
from tests.conftest import PLANTED, SECRETS, URL



def assert_clean(text: str) -> None:
    found = [s for s in SECRETS if s in text]
    assert not found, f"planted secrets leaked: {found}"


def test_redact_masks_secret_names_at_any_depth():
    opts = {**PLANTED, "endpoint_url": "http://127.0.0.1:9000", "region": "us-east-1", "nested": [dict(PLANTED)]}
    red = storage.redact(opts)
    assert_clean(json.dumps(red))
    assert red["endpoint_url"] == "http://127.0.0.1:9000" and red["region"] == "us-east-1"
    assert red["headers"]["Authorization"] == "***" and red["nested"][0]["aws_access_key_id"] == "***"


def test_redact_masks_secret_shapes_in_text():
    message = (f"OSError: cannot read {URL}/x.tar with {{'key': 'AKIAPLANTED000000001', "
               f"'secret': 'wJalrXUtnFEMIplanted7MDENGbPxRfiCYEXAMPL'}}; headers Authorization: Bearer "
               f"planted.bearer.token; {PLANTED['connection_string']} passwd=planted-passwd "
               f"s3://b/k?X-Amz-Security-Token=planted-session-token&sig=planted-sas x-api-key: planted-api-key")
    red = storage.redact(message)
    assert_clean(red)
    assert "sftp://***@files.example/data/x.tar" in red  # the place stays readable
    keep = "step 12 of 40: loss 0.31, shard s3://b/ds/train-000001.tar, sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709"
    assert storage.redact(keep) == keep


def test_config_files_hold_no_secret():
    from selfsup.trainers.config import PretrainConfig

    cfg = from_dict(PretrainConfig, {"storage": dict(PLANTED, endpoint_url="http://127.0.0.1:9000"),
                                     "data": {"sources": [{"url": URL}]}, "retrain": {"runs": URL}})
    text = to_yaml(cfg)
    assert_clean(text)
    back = yaml.safe_load(text)
    assert back["storage"] == {"endpoint_url": "http://127.0.0.1:9000", "headers": {}, "client_kwargs": {}}
    assert back["retrain"]["runs"] == "sftp://***@files.example/data"
    assert to_dict(cfg, secrets=True)["storage"]["passwd"] == "planted-passwd"  # the process itself keeps them
