"""Bulyan and FaultTolerantFedAvg against Flower 1.42's own (flwr.server.strategy), on the same
updates, as test_strategies_flower.py does for the others; and what the robust rules report
about the clients they left out, checked against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server import strategy as fl  # noqa: E402
from flwr.server.strategy.aggregate import aggregate_krum  # noqa: E402

from ppml_fast.federated import (Bulyan, ClientProxy, FaultTolerantFedAvg, FedMedian,  # noqa: E402
                                 FedTrimmedAvg, FitResult, Krum)
from ppml_fast.federated.strategy.report import take_report  # noqa: E402

SPLIT = (6, 13)


def _layers(v):
    return [a.copy() for a in np.split(v.astype(np.float32), SPLIT)]


def _flower(strategy, w, u, n, failures=0):
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(_layers(w + u[k])), int(n[k]), {}))
               for k in range(len(u))]
    params, _ = strategy.aggregate_fit(1, results, [RuntimeError("x")] * failures)
    return None if params is None else np.concatenate(parameters_to_ndarrays(params))


def _ours(strategy, w, u, n, failures=0):
    results = [(ClientProxy(k), FitResult(update=torch.from_numpy(u[k]), num_examples=int(n[k])))
               for k in range(len(u))]
    fails = [(ClientProxy(100 + j), "timeout") for j in range(failures)]
    new, _ = strategy.aggregate_fit(1, torch.from_numpy(w), results, fails)
    return new.numpy()


def _data(k, p=20, seed=0, outliers=0):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 40, size=k)
    w = rng.normal(size=p).astype(np.float32)
    u = rng.normal(scale=0.3, size=(k, p)).astype(np.float32)
    u[:outliers] += rng.normal(scale=20.0, size=(outliers, p)).astype(np.float32)
    return w, u, n


@pytest.mark.parametrize("k,f,outliers", [(7, 1, 1), (11, 2, 2), (12, 2, 0), (3, 0, 0), (10, 1, 1)])
def test_bulyan_matches_flower(k, f, outliers):
    w, u, n = _data(k, seed=k + f, outliers=outliers)
    ours = _ours(Bulyan(num_malicious_clients=f), w, u, n)
    flower = fl.Bulyan(num_malicious_clients=f, first_aggregation_rule=aggregate_krum, to_keep=0)
    theirs = _flower(flower, w, u, n)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bulyan_refuses_too_few_and_reports_outliers():
    with pytest.raises(ValueError, match="min_fit_clients"):
        Bulyan(num_malicious_clients=2, min_fit_clients=10)
    w, u, n = _data(6)
    with pytest.raises(ValueError, match="4 \\* num_malicious_clients \\+ 3 = 7"):
        _ours(Bulyan(num_malicious_clients=1, min_fit_clients=7), w, u, n)
    w, u, n = _data(11, outliers=2, seed=3)
    s = Bulyan(num_malicious_clients=2)
    _ours(s, w, u, n)
    report = take_report(s)
    whole = {e["cid"] for e in report.excluded if e["rule"] == "bulyan_selection"}
    assert len(whole) == 4 and {0, 1} <= whole  # K - theta = 2f left out, the far-away two among them
    assert take_report(s) is None  # read once
    # every selected client: the share of coordinates the trimmed mean did not take, in (0, 1]
    beta, theta, p = 11 - 8, 11 - 4, u.shape[1]
    trims = [e for e in report.excluded if e["rule"] == "bulyan_trim"]
    used = sum((1 - e["fraction"]) * p for e in trims) + p * (theta - len(trims))
    assert used == pytest.approx(beta * p)


@pytest.mark.parametrize("k,failures,expect_none", [(4, 4, False), (4, 5, True), (3, 0, False), (1, 2, True)])
def test_fault_tolerant_matches_flower(k, failures, expect_none):
    w, u, n = _data(k, seed=k)
    theirs = _flower(fl.FaultTolerantFedAvg(), w, u, n, failures)
    s = FaultTolerantFedAvg()
    ours = _ours(s, w, u, n, failures)
    report = take_report(s)
    if expect_none:
        assert theirs is None
        np.testing.assert_array_equal(ours, w)
        assert "completion rate" in report.skip_reason
    else:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        assert report.skip_reason is None


def test_fault_tolerant_evaluate_gate():
    from ppml_fast.federated import EvalResult
    s = FaultTolerantFedAvg(min_completion_rate_evaluate=0.75)
    res = [(ClientProxy(0), EvalResult(loss=1.0, num_examples=2)),
           (ClientProxy(1), EvalResult(loss=3.0, num_examples=2))]
    assert s.aggregate_evaluate(1, res, [(ClientProxy(2), "x")]) == (None, {})
    assert s.aggregate_evaluate(1, res, [])[0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="min_completion_rate_fit"):
        FaultTolerantFedAvg(min_completion_rate_fit=1.5)


@pytest.mark.parametrize("k", [7, 8])
def test_median_reports_unused_coordinates(k):
    w, u, n = _data(k, seed=k)
    s = FedMedian()
    _ours(s, w, u, n)
    report = take_report(s)
    # float64 numpy reference: the rows holding the middle value(s) of each coordinate
    order = np.argsort(u.astype(np.float64), axis=0, kind="stable")
    mid = order[[k // 2]] if k % 2 else order[[k // 2 - 1, k // 2]]
    used = np.bincount(mid.ravel(), minlength=k)
    expect = {c: 1 - used[c] / u.shape[1] for c in range(k) if used[c] < u.shape[1]}
    got = {e["cid"]: e["fraction"] for e in report.excluded}
    assert got.keys() == expect.keys()
    for c in got:
        assert got[c] == pytest.approx(expect[c])
    assert all(e["rule"] == "median" for e in report.excluded)


def test_trimmed_mean_reports_cut_coordinates():
    k, beta = 10, 0.2
    w, u, n = _data(k, seed=1, outliers=2)
    s = FedTrimmedAvg(beta=beta)
    _ours(s, w, u, n)
    report = take_report(s)
    order = np.argsort(u.astype(np.float64), axis=0, kind="stable")
    cut = int(beta * k)
    trimmed = np.bincount(np.concatenate([order[:cut].ravel(), order[k - cut:].ravel()]), minlength=k)
    got = {e["cid"]: e["fraction"] for e in report.excluded}
    for c in range(k):
        assert got.get(c, 0.0) == pytest.approx(trimmed[c] / u.shape[1])
    assert got[0] > 0.5 and got[1] > 0.5  # the outliers are cut in most coordinates


def test_krum_reports_left_out_clients():
    w, u, n = _data(9, seed=2, outliers=2)
    s = Krum(num_malicious_clients=2)
    _ours(s, w, u, n)
    excluded = take_report(s).excluded
    assert len(excluded) == 8 and all(e["fraction"] == 1.0 and e["rule"] == "krum" for e in excluded)
    assert {0, 1} <= {e["cid"] for e in excluded}
    s = Krum(num_malicious_clients=2, num_clients_to_keep=5)
    _ours(s, w, u, n)
    excluded = take_report(s).excluded
    assert len(excluded) == 4 and {0, 1} <= {e["cid"] for e in excluded}


@pytest.mark.parametrize("make", [lambda: Bulyan(num_malicious_clients=1), lambda: FaultTolerantFedAvg(),
                                  FedMedian, lambda: FedTrimmedAvg(beta=0.2)])
def test_robust_strategies_leave_the_shared_update_matrix_alone(make):
    w, u, n = _data(8, seed=5)
    matrix = torch.from_numpy(u.copy())  # the updates as rows of one matrix, as the vectorized backend
    results = [(ClientProxy(k), FitResult(update=matrix[k], num_examples=int(n[k]))) for k in range(8)]
    before, params = matrix.clone(), torch.from_numpy(w.copy())
    make().aggregate_fit(1, params, results, [])
    assert torch.equal(matrix, before) and torch.equal(params, torch.from_numpy(w))
