"""Evaluation of checkpoints: the probe job (job.py), the results store (results.py), reports (report.py)."""
