"""selfsup's data pipeline: storage, shards and manifests, epoch plans, modalities, masks, streams."""
