"""Partitioners: cover, determinism, the skew each one promises, and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ppml_fast.datasets import digits
from ppml_fast.federated import (
    dirichlet_partition,
    iid_partition,
    quantity_skew_partition,
    shard_partition,
)

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def train():
    return digits(seed=0)[0]


def synthetic(n: int = 1000, num_classes: int = NUM_CLASSES, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return TensorDataset(x, y)


PARTITIONERS = {
    "iid": lambda ds, k, seed: iid_partition(ds, k, seed=seed),
    "dirichlet": lambda ds, k, seed: dirichlet_partition(ds, k, alpha=0.5, seed=seed),
    "shard": lambda ds, k, seed: shard_partition(ds, k, shards_per_client=2, seed=seed),
    "quantity": lambda ds, k, seed: quantity_skew_partition(ds, k, alpha=0.5, seed=seed),
}


def labels_of(ds: TensorDataset) -> np.ndarray:
    return ds.tensors[1].numpy()


def index_lists(parts) -> list[list[int]]:
    return [list(p.indices) for p in parts]


def mean_tv(parts, y: np.ndarray) -> float:
    """Mean total-variation distance of the clients' label histograms from the global one."""
    glob = np.bincount(y, minlength=NUM_CLASSES) / len(y)
    tvs = []
    for p in parts:
        h = np.bincount(y[np.asarray(p.indices)], minlength=NUM_CLASSES) / len(p.indices)
        tvs.append(0.5 * np.abs(h - glob).sum())
    return float(np.mean(tvs))


# --------------------------------------------------------------------------- common properties


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
@pytest.mark.parametrize("source", ["synthetic", "digits"])
def test_disjoint_complete_cover(name, source, train):
    ds = synthetic() if source == "synthetic" else train
    parts = PARTITIONERS[name](ds, 7, 3)
    assert len(parts) == 7
    assert all(isinstance(p, Subset) and p.dataset is ds for p in parts)
    flat = np.concatenate([np.asarray(p.indices, dtype=np.int64) for p in parts])
    assert len(flat) == len(ds)  # no index twice ...
    assert np.array_equal(np.sort(flat), np.arange(len(ds)))  # ... and none missing
    # a Subset's items are the dataset's items
    i = parts[0].indices[0]
    assert torch.equal(parts[0][0][0], ds[i][0])


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_same_seed_same_partition_other_seed_differs(name):
    ds = synthetic()
    a = index_lists(PARTITIONERS[name](ds, 5, 11))
    b = index_lists(PARTITIONERS[name](ds, 5, 11))
    c = index_lists(PARTITIONERS[name](ds, 5, 12))
    assert a == b
    assert a != c


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_one_client_gets_everything(name):
    ds = synthetic(50)
    (only,) = PARTITIONERS[name](ds, 1, 0)
    assert sorted(only.indices) == list(range(50))


# --------------------------------------------------------------------------- iid


def test_iid_sizes_and_label_mix(train):
    y = labels_of(train)
    k = 10
    parts = iid_partition(train, k, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(train)
    # Analytic expectation of the TV distance of an m-sample multinomial histogram from its
    # probabilities: 0.5 * sum_c sqrt(2/pi) * sqrt(p_c (1 - p_c) / m) (about 0.1 here). A label-
    # sorted split would be near 0.9; allow twice the expectation.
    p = np.bincount(y, minlength=NUM_CLASSES) / len(y)
    m = len(train) / k
    expected = 0.5 * np.sum(math.sqrt(2 / math.pi) * np.sqrt(p * (1 - p) / m))
    assert mean_tv(parts, y) < 2 * expected


def test_iid_mixes_a_label_sorted_dataset():
    # samples stored sorted by label: contiguous blocks would give each client ~1 class (TV ~0.9)
    y = torch.arange(NUM_CLASSES).repeat_interleave(200)
    ds = TensorDataset(torch.randn(len(y), 2), y)
    parts = iid_partition(ds, 10, seed=0)
    # expectation as above with p_c = 0.1, m = 200: 0.5 * 10 * 0.798 * sqrt(0.09 / 200) ~ 0.085
    assert mean_tv(parts, y.numpy()) < 0.17


def test_iid_uneven_division():
    parts = iid_partition(synthetic(103), 10, seed=1)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_small_alpha_skews_labels_much_more(train):
    y = labels_of(train)
    seeds = range(5)
    skewed = [mean_tv(dirichlet_partition(train, 10, alpha=0.1, seed=s), y) for s in seeds]
    mild = [mean_tv(dirichlet_partition(train, 10, alpha=100.0, seed=s), y) for s in seeds]
    # Measured on digits (10 clients, seeds 0-9): alpha=0.1 gives 0.58-0.74, alpha=100 gives
    # 0.032-0.045 (near the ~0.1-or-less sampling noise of an IID split). Thresholds sit between
    # the two with a wide margin on each side; the ordering must hold for every seed pair.
    assert min(skewed) > 0.4
    assert max(mild) < 0.1
    assert min(skewed) > 5 * max(mild)


def test_dirichlet_min_size_enforced(train):
    # without the constraint some client of this draw ends up below 10 samples ...
    loose = dirichlet_partition(train, 20, alpha=0.1, seed=0, min_size=0)
    assert min(len(p) for p in loose) < 10
    # ... with it, the draw is repeated until every client has at least 10
    tight = dirichlet_partition(train, 20, alpha=0.1, seed=0, min_size=10)
    assert min(len(p) for p in tight) >= 10
    assert sum(len(p) for p in tight) == len(train)


def test_dirichlet_gives_up_with_clear_error(train):
    with pytest.raises(ValueError, match="max_retries"):
        dirichlet_partition(train, 50, alpha=0.01, seed=0, min_size=25, max_retries=5)


def test_dirichlet_labels_argument_overrides():
    # two independent 10-class labellings of the same 1000 samples: the dataset's own (i mod 10)
    # and one passed as labels= (i // 100); the partition is skewed in whichever one it used
    n = 1000
    own_y = torch.arange(n) % NUM_CLASSES
    arg_y = torch.arange(n) // 100
    ds = TensorDataset(torch.randn(n, 2), own_y)
    own = dirichlet_partition(ds, 10, alpha=0.1, seed=0)
    given = dirichlet_partition(ds, 10, alpha=0.1, seed=0, labels=arg_y)
    assert mean_tv(own, own_y.numpy()) > 0.4 > mean_tv(own, arg_y.numpy())
    assert mean_tv(given, arg_y.numpy()) > 0.4 > mean_tv(given, own_y.numpy())


class PairDataset(Dataset):
    """A generic Dataset (not a TensorDataset): labels come from ``dataset[i][1]``."""

    def __init__(self, y: torch.Tensor):
        self.y = y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.zeros(2), self.y[i]


def test_labels_read_from_items_and_nested_subsets():
    base = synthetic(600)
    generic = PairDataset(base.tensors[1])
    a = dirichlet_partition(base, 6, alpha=0.3, seed=4)
    b = dirichlet_partition(generic, 6, alpha=0.3, seed=4)
    assert index_lists(a) == index_lists(b)
    # a Subset of a TensorDataset: labels are the subset's own
    sub = Subset(base, list(range(0, 600, 2)))
    c = dirichlet_partition(sub, 6, alpha=0.3, seed=4)
    d = dirichlet_partition(sub, 6, alpha=0.3, seed=4, labels=base.tensors[1][::2])
    assert index_lists(c) == index_lists(d)


# --------------------------------------------------------------------------- shards


def test_shard_clients_have_few_labels_exact_shards():
    # 10 classes x 100 samples, 50 clients x 2 shards = 100 shards of 10: every shard is one class
    y = torch.arange(NUM_CLASSES).repeat_interleave(100)
    ds = TensorDataset(torch.randn(len(y), 2), y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    yn = labels_of(ds)
    parts = shard_partition(ds, 50, shards_per_client=2, seed=0)
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(yn[np.asarray(p.indices)])) <= 2 for p in parts)


def test_shard_clients_have_few_labels_digits(train):
    y = labels_of(train)
    s = 2
    parts = shard_partition(train, 10, shards_per_client=s, seed=0)
    # 20 shards of ~72 samples; every class has > 72 samples, so a shard straddles at most one
    # label boundary: at most s labels plus one per shard at a boundary
    assert np.bincount(y).min() > len(train) // 20 + 1
    distinct = [len(np.unique(y[np.asarray(p.indices)])) for p in parts]
    assert max(distinct) <= 2 * s
    assert np.mean(distinct) < NUM_CLASSES / 2
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= s


# --------------------------------------------------------------------------- quantity skew


def test_quantity_skew_sizes(train):
    n = len(train)
    skewed = [len(p) for p in quantity_skew_partition(train, 10, alpha=0.5, seed=0)]
    near_equal = [len(p) for p in quantity_skew_partition(train, 10, alpha=1e4, seed=0)]
    assert sum(skewed) == n and sum(near_equal) == n
    # IID sizes would differ by at most 1; Dirichlet(0.5) proportions have a coefficient of
    # variation near 1 (sd/mean = sqrt((k-1)/(k*alpha+1)) ~ 1.3 for k=10), Dirichlet(1e4) ~ 0.01
    assert max(skewed) - min(skewed) > n / 10
    assert np.std(skewed) > 10 * np.std(near_equal)


def test_quantity_skew_min_size():
    ds = synthetic(500)
    parts = quantity_skew_partition(ds, 20, alpha=0.05, seed=0, min_size=8)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 8 and sum(sizes) == 500
    loose = [len(p) for p in quantity_skew_partition(ds, 20, alpha=0.05, seed=0, min_size=0)]
    assert min(loose) < 8


# --------------------------------------------------------------------------- scale


def test_vectorised_on_large_dataset():
    n = 200_000
    ds = TensorDataset(torch.zeros(n, 1), torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0)))
    for name, fn in PARTITIONERS.items():
        parts = fn(ds, 1000, 0)
        assert sum(len(p) for p in parts) == n, name


# --------------------------------------------------------------------------- bad input


ALL = [
    lambda ds, **kw: iid_partition(ds, **kw),
    lambda ds, **kw: dirichlet_partition(ds, alpha=kw.pop("alpha", 1.0), **kw),
    lambda ds, **kw: shard_partition(ds, **kw),
    lambda ds, **kw: quantity_skew_partition(ds, alpha=kw.pop("alpha", 1.0), **kw),
]


@pytest.mark.parametrize("fn", ALL, ids=["iid", "dirichlet", "shard", "quantity"])
@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(num_clients=0, seed=0), ValueError, "num_clients"),
        (dict(num_clients=41, seed=0), ValueError, "num_clients"),
        (dict(num_clients=2.0, seed=0), TypeError, "num_clients"),
        (dict(num_clients=2, seed=1.5), TypeError, "seed"),
        (dict(num_clients=2, seed="0"), TypeError, "seed"),
        (dict(num_clients=2, seed=True), TypeError, "seed"),
    ],
)
def test_bad_common_arguments(fn, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        fn(synthetic(40), **kwargs)


@pytest.mark.parametrize("fn", [dirichlet_partition, quantity_skew_partition])
@pytest.mark.parametrize("alpha, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("1", TypeError)])
def test_bad_alpha(fn, alpha, exc):
    with pytest.raises(exc, match="alpha"):
        fn(synthetic(40), 2, alpha=alpha, seed=0)


@pytest.mark.parametrize("fn", [dirichlet_partition, quantity_skew_partition])
def test_bad_min_size(fn):
    with pytest.raises(ValueError, match="min_size"):
        fn(synthetic(40), 5, alpha=1.0, seed=0, min_size=9)
    with pytest.raises(ValueError, match="min_size"):
        fn(synthetic(40), 5, alpha=1.0, seed=0, min_size=-1)


def test_bad_shards():
    with pytest.raises(ValueError, match="shards"):
        shard_partition(synthetic(40), 10, shards_per_client=5, seed=0)
    with pytest.raises(ValueError, match="shards_per_client"):
        shard_partition(synthetic(40), 2, shards_per_client=0, seed=0)
    with pytest.raises(TypeError, match="shards_per_client"):
        shard_partition(synthetic(40), 2, shards_per_client=1.5, seed=0)


def test_bad_labels():
    ds = synthetic(40)
    with pytest.raises(ValueError, match="labels"):
        dirichlet_partition(ds, 2, alpha=1.0, seed=0, labels=torch.zeros(39, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        shard_partition(ds, 2, seed=0, labels=torch.zeros(40, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="labels"):
        shard_partition(ds, 2, seed=0, labels=torch.rand(40))
