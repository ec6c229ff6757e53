"""Embedded data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download)
and generated data for scale tests."""

from __future__ import annotations

import numbers

import torch
from torch.utils.data import TensorDataset


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of sklearn's digits: float32 features (64 pixels) scaled to [0, 1], int64
    labels 0-9; a seeded, stratified-by-nothing random split with ``test_fraction`` held out."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    from sklearn.datasets import load_digits  # an optional dependency: the demo's data

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(int(seed)))
    n_test = max(1, round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])
