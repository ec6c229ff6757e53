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


def synthetic_classification(n: int, *, features: int = 64, classes: int = 10,
                             seed: int = 0) -> TensorDataset:
    """``n`` generated samples for scale tests: labels uniform over ``classes`` (int64), inputs
    (float32, ``features`` wide) = the label's centre + N(0, I), the centres drawn once from
    N(0, I / 4) (a learnable, not separable, Gaussian mixture). Seeded: same arguments, same data."""
    for name, v, lo in (("n", n, 0), ("features", features, 1), ("classes", classes, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int; got {type(v).__name__}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}; got {v}")
    gen = torch.Generator().manual_seed(int(seed))
    centres = torch.randn(int(classes), int(features), generator=gen) / 2
    y = torch.randint(0, int(classes), (int(n),), generator=gen)
    x = centres[y] + torch.randn(int(n), int(features), generator=gen)
    return TensorDataset(x, y)
