"""Benchmarks behind `selfsup bench`: the pipeline against common loaders (pipeline.py, loaders.py)."""
