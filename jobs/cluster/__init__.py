"""Cluster operations: submitting jobs to a Ray cluster, the Ray Jobs client, scheduled retraining."""
