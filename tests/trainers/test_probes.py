"""kNN and the linear probe agree with scikit-learn on synthetic features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.trainers.probes import knn_accuracy, linear_probe_accuracy


def blobs(n: int, d: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(99).normal(size=(classes, d)) * 2.0  # shared by train and test
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    return (centers[y] + rng.normal(scale=spread, size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("spread", [4.0, 7.0])
def test_knn_matches_sklearn_weighted_cosine(spread):
    from sklearn.neighbors import KNeighborsClassifier

    xtr, ytr = blobs(2000, 32, 10, spread, 0)
    xte, yte = blobs(500, 32, 10, spread, 1)
    ours = knn_accuracy(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))
    ref = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(xtr, ytr).score(xte, yte)
    assert 0.2 < ours < 1.0
    assert abs(ours - ref) <= 0.01


@pytest.mark.parametrize("spread", [5.0, 8.0])
def test_linear_probe_matches_sklearn_logistic_regression(spread):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = blobs(2000, 32, 10, spread, 2)
    xte, yte = blobs(500, 32, 10, spread, 3)
    ours = linear_probe_accuracy(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                                 torch.from_numpy(yte))
    scaler = StandardScaler().fit(xtr)
    ref = LogisticRegression(C=1.0 / (1e-4 * len(xtr)), max_iter=2000).fit(scaler.transform(xtr), ytr) \
        .score(scaler.transform(xte), yte)
    assert 0.2 < ours < 1.0
    assert abs(ours - ref) <= 0.01


def test_linear_probe_is_deterministic_and_errors_are_clear():
    xtr, ytr = blobs(300, 8, 3, 2.0, 4)
    args = (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xtr[:50]), torch.from_numpy(ytr[:50]))
    assert linear_probe_accuracy(*args) == linear_probe_accuracy(*args)
    with pytest.raises(ValueError, match="empty"):
        knn_accuracy(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), *args[2:])
