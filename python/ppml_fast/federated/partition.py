"""Seeded partitioners: split one labelled torch ``Dataset`` into one ``Subset`` per client.

Every partitioner assigns each index of the dataset to exactly one client and returns the
clients' subsets in client order, each with its indices sorted ascending. Randomness comes only
from ``numpy.random.default_rng(seed)``, so the same arguments give the same partition. The work
is vectorised over samples (loops run over classes or clients only).

Labels are read, in order of preference, from the ``labels=`` argument (a 1-D integer tensor or
sequence with one entry per sample), from a ``TensorDataset``'s second tensor (also through
nested ``Subset``s of one), or else by indexing ``dataset[i][1]`` for every sample.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["dirichlet_partition", "iid_partition", "quantity_skew_partition", "shard_partition"]

_DEFAULT_MAX_RETRIES = 1000


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return int(value)


def _check_seed(seed: Any) -> int:
    return _check_int("seed", seed)


def _check_num_clients(num_clients: Any, n: int) -> int:
    k = _check_int("num_clients", num_clients)
    if k < 1 or k > n:
        raise ValueError(f"num_clients must be in [1, len(dataset)={n}]; got {k}")
    return k


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number; got {type(alpha).__name__}")
    a = float(alpha)
    if not math.isfinite(a) or a <= 0:
        raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
    return a


def _check_min_size(min_size: Any, num_clients: int, n: int) -> int:
    m = _check_int("min_size", min_size)
    if m < 0:
        raise ValueError(f"min_size must be >= 0; got {m}")
    if m * num_clients > n:
        raise ValueError(
            f"min_size={m} cannot be met: num_clients * min_size = {m * num_clients} > len(dataset) = {n}"
        )
    return m


def _dataset_len(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError as exc:
        raise TypeError(f"dataset must be a sized torch Dataset; got {type(dataset).__name__}") from exc


def _labels_of(dataset: Any) -> np.ndarray:
    """Labels of ``dataset`` without the ``labels=`` override (see the module docstring)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return torch.as_tensor(dataset.tensors[1]).detach().cpu().numpy()
    if isinstance(dataset, Subset):
        inner = _labels_of(dataset.dataset)
        return inner[np.asarray(dataset.indices, dtype=np.int64)]
    ys = []
    for i in range(len(dataset)):  # generic datasets: only per-sample indexing is available
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(
                "dataset items must be (input, label, ...) pairs to read labels; pass labels= instead"
            )
        y = item[1]
        ys.append(y.item() if isinstance(y, torch.Tensor) else y)
    return np.asarray(ys)


def _get_labels(dataset: Any, labels: Any, n: int) -> np.ndarray:
    if labels is not None:
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        src = "labels"
    else:
        y = _labels_of(dataset)
        src = "dataset labels"
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{src} must be 1-D (one label per sample); got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{src} must have len(dataset)={n} entries; got {y.shape[0]}")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise TypeError(f"{src} must be integers; got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- helpers


def _subsets(dataset: Dataset, owner: np.ndarray, num_clients: int) -> list[Subset]:
    """One ``Subset`` per client from ``owner[i]`` = client of sample ``i``; indices ascending."""
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_clients)
    parts = np.split(order, np.cumsum(counts)[:-1])
    return [Subset(dataset, part.tolist()) for part in parts]


def _split_counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, following ``proportions`` (floor of cumulative shares)."""
    cum = np.floor(np.cumsum(proportions) * total).astype(np.int64)
    cum = np.minimum(cum, total)
    cum[-1] = total
    return np.diff(cum, prepend=0)


# --------------------------------------------------------------------------- partitioners


def iid_partition(dataset: Dataset, num_clients: int, *, seed: int) -> list[Subset]:
    """IID split: a seeded random permutation cut into ``num_clients`` parts whose sizes differ by
    at most one."""
    n = _dataset_len(dataset)
    k = _check_num_clients(num_clients, n)
    rng = np.random.default_rng(_check_seed(seed))
    perm = rng.permutation(n)
    owner = np.empty(n, dtype=np.int64)
    owner[perm] = np.arange(n, dtype=np.int64) * k // n  # consecutive blocks of near-equal size
    return _subsets(dataset, owner, k)


def dirichlet_partition(
    dataset: Dataset,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    labels: torch.Tensor | Sequence[int] | None = None,
    max_retries: int = _DEFAULT_MAX_RETRIES,
) -> list[Subset]:
    """Label skew (Hsu et al. 2019): for every class, the class's samples (shuffled) are split over
    the clients in proportions drawn from ``Dirichlet(alpha, ..., alpha)``. Small ``alpha`` gives
    clients few classes each; large ``alpha`` approaches IID. The whole draw is repeated until every
    client holds at least ``min_size`` samples, at most ``max_retries`` times, else ``ValueError``."""
    n = _dataset_len(dataset)
    k = _check_num_clients(num_clients, n)
    a = _check_alpha(alpha)
    m = _check_min_size(min_size, k, n)
    retries = _check_int("max_retries", max_retries)
    if retries < 1:
        raise ValueError(f"max_retries must be >= 1; got {retries}")
    seed = _check_seed(seed)
    y = _get_labels(dataset, labels, n)

    rng = np.random.default_rng(seed)
    _, y_idx = np.unique(y, return_inverse=True)
    by_class = np.argsort(y_idx, kind="stable")
    class_counts = np.bincount(y_idx)
    class_members = np.split(by_class, np.cumsum(class_counts)[:-1])
    clients = np.arange(k, dtype=np.int64)
    owner = np.empty(n, dtype=np.int64)
    sizes = np.zeros(k, dtype=np.int64)
    for _ in range(retries):
        for members in class_members:
            p = rng.dirichlet(np.full(k, a))
            counts = _split_counts(p, members.shape[0])
            owner[rng.permutation(members)] = np.repeat(clients, counts)
        sizes = np.bincount(owner, minlength=k)
        if sizes.min() >= m:
            return _subsets(dataset, owner, k)
    raise ValueError(
        f"dirichlet_partition: no draw within max_retries={retries} gave every client min_size={m} "
        f"samples (alpha={a}, num_clients={k}, len(dataset)={n}; smallest client in the last draw: "
        f"{int(sizes.min())}); raise alpha, lower min_size or num_clients"
    )


def shard_partition(
    dataset: Dataset,
    num_clients: int,
    *,
    shards_per_client: int = 2,
    seed: int,
    labels: torch.Tensor | Sequence[int] | None = None,
) -> list[Subset]:
    """Pathological non-IID split (McMahan et al. 2017): sort the samples by label (ties in a
    seeded random order), cut them into ``num_clients * shards_per_client`` contiguous shards whose
    sizes differ by at most one, and give each client ``shards_per_client`` shards at random."""
    n = _dataset_len(dataset)
    k = _check_num_clients(num_clients, n)
    s = _check_int("shards_per_client", shards_per_client)
    if s < 1:
        raise ValueError(f"shards_per_client must be >= 1; got {s}")
    num_shards = k * s
    if num_shards > n:
        raise ValueError(
            f"shards cannot be formed: num_clients * shards_per_client = {num_shards} shards "
            f"> len(dataset) = {n} samples"
        )
    seed = _check_seed(seed)
    y = _get_labels(dataset, labels, n)

    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(y[shuffled], kind="stable")]  # by label, random within a label
    shard_of_pos = np.arange(n, dtype=np.int64) * num_shards // n  # contiguous near-equal shards
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards, dtype=np.int64) // s
    owner = np.empty(n, dtype=np.int64)
    owner[order] = client_of_shard[shard_of_pos]
    return _subsets(dataset, owner, k)


def quantity_skew_partition(
    dataset: Dataset,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[Subset]:
    """Quantity skew: client sizes follow ``Dirichlet(alpha, ..., alpha)`` proportions, with the
    samples taken as consecutive blocks of one seeded random permutation (so label mixes stay
    IID). Every client first gets ``min_size`` samples; the remaining ``n - num_clients * min_size``
    are divided by the Dirichlet proportions (floor of cumulative shares), so no retries are needed."""
    n = _dataset_len(dataset)
    k = _check_num_clients(num_clients, n)
    a = _check_alpha(alpha)
    m = _check_min_size(min_size, k, n)
    rng = np.random.default_rng(_check_seed(seed))
    p = rng.dirichlet(np.full(k, a))
    sizes = m + _split_counts(p, n - k * m)
    perm = rng.permutation(n)
    owner = np.empty(n, dtype=np.int64)
    owner[perm] = np.repeat(np.arange(k, dtype=np.int64), sizes)
    return _subsets(dataset, owner, k)
