"""Strategies against independent float64 numpy implementations of their formulas, server
state round trips, FedProx's proximal step, and bad hyper-parameters.

(Flower's own strategy objects: test_strategies_flower.py; Byzantine clients:
test_strategies_byzantine.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from ppml_fast.federated import (Client, ClientProxy, FedAdagrad, FedAdam, FedAvg, FedAvgM,
                                 FedMedian, FedOpt, FedProx, FedTrimmedAvg, FedYogi, FitResult,
                                 Krum, ParameterLayout)
from ppml_fast.federated.strategy.fedmedian import coordinate_median
from ppml_fast.federated.strategy.krum import krum_scores, pairwise_sq_distances


def _results(u: np.ndarray, n) -> list:
    return [(ClientProxy(k), FitResult(update=torch.from_numpy(u[k]).float(), num_examples=int(n[k])))
            for k in range(len(u))]


def _draws(k=7, p=13, rounds=3, seed=0):
    rng = np.random.default_rng(seed)
    us = [rng.normal(size=(k, p)).astype(np.float32) for _ in range(rounds)]
    n = rng.integers(1, 50, size=k)
    w0 = rng.normal(size=p).astype(np.float32)
    return w0, us, n


def _wmean(u, n):
    u = u.astype(np.float64)
    return (n[:, None] * u).sum(0) / n.sum()


def _run(strategy, w0, us, n):
    """Our strategy over several rounds: the parameters after each."""
    w, out = torch.from_numpy(w0), []
    for t, u in enumerate(us, start=1):
        w, metrics = strategy.aggregate_fit(t, w, _results(u, n), [])
        assert w.dtype == torch.float32 and isinstance(metrics, dict)
        out.append(w.numpy().astype(np.float64))
    return out


# ------------------------------------------------------------------ FedAvgM

@pytest.mark.parametrize("lr,beta", [(1.0, 0.0), (0.7, 0.9), (1.5, 0.5)])
def test_fedavgm_is_server_sgd_with_momentum(lr, beta):
    w0, us, n = _draws()
    got = _run(FedAvgM(server_learning_rate=lr, server_momentum=beta), w0, us, n)
    w, m = w0.astype(np.float64), None
    for t, u in enumerate(us):
        g = -_wmean(u, n)
        m = g if m is None else beta * m + g
        w = w - lr * m
        np.testing.assert_allclose(got[t], w, rtol=1e-5, atol=1e-5)


def test_fedavgm_defaults_are_fedavg():
    w0, us, n = _draws()
    np.testing.assert_allclose(_run(FedAvgM(), w0, us, n), _run(FedAvg(), w0, us, n), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ FedOpt family

def _fedopt_ref(kind, w0, us, n, eta, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, with Flower's v_0 = 0 and FedAdam's step."""
    w = w0.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for t, u in enumerate(us, start=1):
        d = _wmean(u, n)
        m = b1 * m + (1 - b1) * d
        if kind == "adagrad":
            v = v + d * d
            step = eta
        elif kind == "adam":
            v = b2 * v + (1 - b2) * d * d
            step = eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
            step = eta
        w = w + step * m / (np.sqrt(v) + tau)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("kind,make,kw", [
    ("adam", FedAdam, {}),
    ("adam", FedAdam, dict(eta=0.03, beta_1=0.5, beta_2=0.9, tau=1e-2)),
    ("yogi", FedYogi, {}),
    ("yogi", FedYogi, dict(eta=0.2, beta_1=0.0, beta_2=0.5, tau=0.1)),
    ("adagrad", FedAdagrad, {}),
    ("adagrad", FedAdagrad, dict(eta=0.5, tau=1e-3)),
])
def test_fedopt_family_matches_algorithm_2(kind, make, kw):
    w0, us, n = _draws(rounds=4)
    strategy = make(**kw)
    eta, b1, b2, tau = strategy.eta, strategy.beta_1, strategy.beta_2, strategy.tau
    got = _run(strategy, w0, us, n)
    for g, r in zip(got, _fedopt_ref(kind, w0, us, n, eta, b1, b2, tau)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_fedopt_flower_defaults():
    a, y, g = FedAdam(), FedYogi(), FedAdagrad()
    assert (a.eta, a.beta_1, a.beta_2, a.tau, a.eta_l) == (0.1, 0.9, 0.99, 1e-9, None)
    assert (y.eta, y.beta_1, y.beta_2, y.tau) == (1e-2, 0.9, 0.99, 1e-3)
    assert (g.eta, g.beta_1, g.tau) == (0.1, 0.0, 1e-9)
    assert isinstance(a, FedOpt) and isinstance(y, FedOpt) and isinstance(g, FedOpt)
    with pytest.raises(TypeError):
        FedOpt(eta=0.1, eta_l=None, beta_1=0.0, beta_2=0.0, tau=1e-9)  # abstract


def test_fedopt_eta_l_goes_to_clients_as_lr():
    clients = [ClientProxy(i) for i in range(5)]
    rng = np.random.default_rng(0)
    w = torch.zeros(3)
    assert all(cfg == {} for _, cfg in FedAdam().configure_fit(1, w, clients, 5, rng))
    pairs = FedYogi(eta_l=0.05).configure_fit(1, w, clients, 3, rng)
    assert len(pairs) == 3 and all(cfg == {"lr": 0.05} for _, cfg in pairs)


@pytest.mark.parametrize("make", [lambda: FedAdam(beta_1=0.5), FedYogi, FedAdagrad,
                                  lambda: FedAvgM(server_momentum=0.8)])
def test_server_state_round_trips(make):
    w0, us, n = _draws(rounds=3)
    a = make()
    ref = _run(a, w0, us, n)
    b = make()
    _run(b, w0, us[:2], n)
    state = b.state_dict()
    c = make()
    c.load_state_dict(state)
    # the state is a copy: aggregating with b does not change what c loaded
    b.aggregate_fit(3, torch.from_numpy(w0), _results(us[2], n), [])
    w, _ = c.aggregate_fit(3, torch.from_numpy(ref[1].astype(np.float32)), _results(us[2], n), [])
    np.testing.assert_allclose(w.numpy(), ref[2], rtol=1e-6, atol=1e-6)


def test_load_state_dict_rejects_bad_state_and_keeps_old():
    s = FedAdam()
    w0, us, n = _draws(rounds=1)
    _run(s, w0, us, n)
    before = s.state_dict()
    with pytest.raises(ValueError, match="v_t"):
        s.load_state_dict({"m_t": torch.zeros(13), "v_t": torch.zeros(4)})
    with pytest.raises(ValueError, match="m_t"):
        s.load_state_dict({"v_t": torch.zeros(13)})
    with pytest.raises(TypeError, match="momentum_vector"):
        FedAvgM().load_state_dict({"momentum_vector": np.zeros(3)})
    assert torch.equal(s.m_t, before["m_t"]) and torch.equal(s.v_t, before["v_t"])
    with pytest.raises(ValueError, match="server moments"):  # a different model's parameters
        s.aggregate_fit(2, torch.zeros(5), _results(np.zeros((2, 5), np.float32), [1, 1]), [])


# ------------------------------------------------------------------ robust aggregators

@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_fedmedian_is_numpy_median(k):
    w0, us, n = _draws(k=k, p=40, rounds=1)
    got = _run(FedMedian(), w0, us, n)[0]
    np.testing.assert_allclose(got, w0 + np.median(us[0].astype(np.float64), axis=0), rtol=1e-6, atol=1e-6)


def test_coordinate_median_even_k_is_mean_of_middle_values():
    u = torch.tensor([[1.0, 10.0], [2.0, -4.0], [7.0, 0.0], [3.0, 2.0]])
    assert torch.equal(coordinate_median(u), torch.tensor([2.5, 1.0]))
    with pytest.raises(ValueError, match="updates"):
        coordinate_median(torch.zeros(0, 3))


@pytest.mark.parametrize("k,beta", [(10, 0.2), (10, 0.0), (7, 0.3), (3, 0.2), (12, 0.49)])
def test_fedtrimmedavg_is_scipy_trim_mean(k, beta):
    w0, us, n = _draws(k=k, p=30, rounds=1)
    got = _run(FedTrimmedAvg(beta=beta), w0, us, n)[0]
    ref = w0 + stats.trim_mean(us[0].astype(np.float64), beta, axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def _krum_ref(u, n, f, m):
    """Blanchard et al. 2017, section 4, with explicit loops in float64."""
    u = u.astype(np.float64)
    k = len(u)
    d = np.array([[np.sum((u[i] - u[j]) ** 2) for j in range(k)] for i in range(k)])
    scores = np.array([np.sort(np.delete(d[i], i))[:k - f - 2].sum() for i in range(k)])
    if m == 0:
        return u[np.argmin(scores)], scores
    best = np.argsort(scores)[:m]
    return _wmean(u[best], n[best]), scores


@pytest.mark.parametrize("k,f,m", [(7, 0, 0), (7, 2, 0), (9, 3, 0), (10, 2, 4), (10, 1, 10), (5, 1, 1)])
def test_krum_and_multikrum_match_the_definition(k, f, m):
    w0, us, n = _draws(k=k, p=25, rounds=1, seed=k + f)
    got = _run(Krum(num_malicious_clients=f, num_clients_to_keep=m), w0, us, n)[0]
    ref, scores = _krum_ref(us[0], n, f, m)
    np.testing.assert_allclose(got, w0 + ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(krum_scores(torch.from_numpy(us[0]), f).numpy(), scores, rtol=1e-9)


def test_pairwise_distances_survive_a_large_common_offset():
    rng = np.random.default_rng(3)
    u = (1e3 + rng.normal(scale=1e-2, size=(6, 500))).astype(np.float32)
    u64 = u.astype(np.float64)
    ref = ((u64[:, None, :] - u64[None, :, :]) ** 2).sum(-1)
    d = pairwise_sq_distances(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12)
    assert np.all(np.diag(d) == 0)


def test_krum_needs_enough_clients():
    assert Krum(num_malicious_clients=2).min_fit_clients == 7
    s = Krum(num_malicious_clients=1)
    u = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"num_malicious_clients.*got 4"):
        s.aggregate_fit(1, torch.zeros(3), _results(u, [1] * 4), [])
    with pytest.raises(ValueError, match="min_fit_clients"):
        Krum(num_malicious_clients=2, min_fit_clients=6)
    with pytest.raises(ValueError, match="num_clients_to_keep"):
        Krum(num_clients_to_keep=4).aggregate_fit(1, torch.zeros(3), _results(u[:3], [1] * 3), [])


@pytest.mark.parametrize("strategy", [FedAvgM(), FedAdam(), FedMedian(), FedTrimmedAvg(), Krum(),
                                      FedProx(proximal_mu=0.1)])
def test_wrong_update_length_is_rejected(strategy):
    with pytest.raises(ValueError, match="client 1's update has 4 entries, expected 3"):
        strategy.aggregate_fit(1, torch.zeros(3), [
            (ClientProxy(0), FitResult(torch.zeros(3), 1)),
            (ClientProxy(1), FitResult(torch.zeros(4), 1)),
            (ClientProxy(2), FitResult(torch.zeros(3), 1))], [])


# ------------------------------------------------------------------ FedProx

def test_fedprox_attaches_mu_and_aggregates_like_fedavg():
    clients = [ClientProxy(i) for i in range(10)]
    s = FedProx(proximal_mu=0.25)
    pairs = s.configure_fit(1, torch.zeros(3), clients, 4, np.random.default_rng(1))
    plain = FedAvg().configure_fit(1, torch.zeros(3), clients, 4, np.random.default_rng(1))
    assert [p for p, _ in pairs] == [p for p, _ in plain]  # same sampling as FedAvg
    assert all(cfg == {"proximal_mu": 0.25} for _, cfg in pairs)
    w0, us, n = _draws()
    np.testing.assert_array_equal(_run(s, w0, us, n), _run(FedAvg(), w0, us, n))


def _regression_client(seed, shift):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + shift
    return Client(TensorDataset(x, y), cid=seed), x.double(), y.double()


def _linear():
    torch.manual_seed(0)
    return nn.Linear(3, 1, bias=False)


@pytest.mark.parametrize("mu", [0.0, 0.5, 2.0])
def test_fedprox_client_step_is_the_proximal_gradient_step(mu):
    """Full-batch local SGD on a least-squares loss, by hand: w <- w - lr (2/n X^T (Xw - y)
    + mu (w - w0)), three steps."""
    client, x, y = _regression_client(0, 3.0)
    model = _linear()
    w0 = ParameterLayout.of(model).flatten(model)
    s = FedProx(proximal_mu=mu)
    [(proxy, extra)] = s.configure_fit(1, w0, [ClientProxy(0)], 1, np.random.default_rng(0))
    cfg = {"model": model, "seed": 0, "lr": 0.05, "batch_size": 16, "local_epochs": 3,
           "loss_fn": nn.functional.mse_loss, **extra}
    res = client.fit(w0, cfg)
    w = w0.double()[:, None]
    anchor = w.clone()
    for _ in range(3):
        grad = 2.0 / 16 * x.T @ (x @ w - y)
        w = w - 0.05 * (grad + mu * (w - anchor))
    np.testing.assert_allclose(res.update.numpy(), (w - anchor)[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_fedprox_reduces_client_drift():
    """On clients whose optima differ, a larger mu keeps each local model closer to the global
    one (Li et al. 2020, the point of eq. 2): the update norm decreases in mu."""
    norms = []
    for mu in (0.0, 0.5, 2.0):
        total = 0.0
        for seed, shift in ((1, -4.0), (2, 4.0)):
            client, _, _ = _regression_client(seed, shift)
            model = _linear()
            w0 = ParameterLayout.of(model).flatten(model)
            cfg = {"model": model, "seed": 0, "lr": 0.05, "batch_size": 4, "local_epochs": 5,
                   "loss_fn": nn.functional.mse_loss, "proximal_mu": mu}
            total += float(client.fit(w0, cfg).update.norm())
        norms.append(total)
    assert norms[0] > norms[1] > norms[2]


# ------------------------------------------------------------------ bad hyper-parameters

@pytest.mark.parametrize("make,arg", [
    (lambda: FedAvgM(server_learning_rate=0.0), "server_learning_rate"),
    (lambda: FedAvgM(server_learning_rate=float("nan")), "server_learning_rate"),
    (lambda: FedAvgM(server_momentum=1.0), "server_momentum"),
    (lambda: FedAvgM(server_momentum=-0.1), "server_momentum"),
    (lambda: FedAvgM(min_fit_clients=0), "min_fit_clients"),
    (lambda: FedProx(proximal_mu=-1.0), "proximal_mu"),
    (lambda: FedProx(proximal_mu="0.1"), "proximal_mu"),
    (lambda: FedProx(), "proximal_mu"),
    (lambda: FedAdam(eta=0.0), "eta"),
    (lambda: FedAdam(eta_l=-0.1), "eta_l"),
    (lambda: FedAdam(beta_1=1.0), "beta_1"),
    (lambda: FedYogi(beta_2=1.5), "beta_2"),
    (lambda: FedYogi(tau=0.0), "tau"),
    (lambda: FedAdagrad(tau=float("inf")), "tau"),
    (lambda: FedTrimmedAvg(beta=0.5), "beta"),
    (lambda: FedTrimmedAvg(beta=-0.1), "beta"),
    (lambda: Krum(num_malicious_clients=-1), "num_malicious_clients"),
    (lambda: Krum(num_malicious_clients=1.5), "num_malicious_clients"),
    (lambda: Krum(num_clients_to_keep=True), "num_clients_to_keep"),
])
def test_bad_hyper_parameters_name_the_argument(make, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        make()


def test_strategy_wrapper_delegates_every_step_it_does_not_override():
    import numpy as np

    from ppml_fast.federated import ClientProxy, EvalResult, FedProx
    from ppml_fast.federated.strategy import StrategyWrapper

    class Passthrough(StrategyWrapper):
        def aggregate_fit(self, server_round, parameters, results, failures):
            return self.strategy.aggregate_fit(server_round, parameters, results, failures)

    inner = FedProx(proximal_mu=0.5)
    w = Passthrough(inner)
    proxies = [ClientProxy(i) for i in range(6)]
    params = torch.zeros(3)
    assert w.configure_fit(1, params, proxies, 3, np.random.default_rng(0)) == \
        inner.configure_fit(1, params, proxies, 3, np.random.default_rng(0))
    evals = [(ClientProxy(0), EvalResult(1.0, 2, {"accuracy": 0.5})),
             (ClientProxy(1), EvalResult(4.0, 1, {"accuracy": 1.0}))]
    assert w.aggregate_evaluate(1, evals, []) == inner.aggregate_evaluate(1, evals, []) == (2.0, {"accuracy": 2 / 3})
    assert torch.equal(w.initialize_parameters(params), params) and w.epsilon(1e-5) is None
    assert w.evaluate(1, params) is None and w.configure_evaluate(1, params, proxies, 3, None) == []
    with pytest.raises(TypeError, match="strategy"):
        Passthrough(object())
