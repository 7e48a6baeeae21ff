"""Frozen-feature probes: weighted kNN (InstDisc/DINO protocol) and a deterministic linear probe."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Cosine kNN with votes weighted by exp(similarity / T); accuracy in [0, 1].

    Args:
        train_x: [N, D] features, train_y: [N] int labels; test_x: [M, D], test_y: [M].
    """
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("kNN needs labeled train and test features; an eval split is empty")
    k = min(k, len(train_x))
    classes = int(max(train_y.max(), test_y.max())) + 1
    train_n = F.normalize(train_x.float(), dim=1)
    correct = 0
    for lo in range(0, len(test_x), chunk):
        q = F.normalize(test_x[lo: lo + chunk].float(), dim=1)  # [m, D]
        sim, idx = (q @ train_n.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(len(q), classes, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx].long(), (sim.double() / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_y[lo: lo + chunk].long()).sum())
    return correct / len(test_x)


def standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both with the train split's mean and std (features are frozen)."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, epochs: int = 100, weight_decay: float = 1e-4,
                          seed: int = 0) -> float:
    """Multinomial logistic regression on standardized frozen features, full-batch L-BFGS.

    Deterministic (fixed seed, fixed iteration count, one thread order on CPU).
    """
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("the linear probe needs labeled train and test features; an eval split is empty")
    xtr, xte = standardize(train_x.float(), test_x.float())
    classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(xtr.shape[1], classes, generator=gen, dtype=torch.float32) * 0.01).requires_grad_()
    b = torch.zeros(classes, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")
    ytr = train_y.long()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (xte @ w + b).argmax(dim=1)
    return float((pred == test_y.long()).float().mean())
