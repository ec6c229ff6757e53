"""NativeFedAvg against Flower's own FedAvg (and its server-side DP wrapper) on the same results."""

from __future__ import annotations

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.server import Server  # noqa: E402
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg  # noqa: E402
from flwr.server.strategy.aggregate import aggregate  # noqa: E402

from ppml_fast.integrations.flower import NativeFedAvg  # noqa: E402
from ppml_fast.ops import noise_blocks, weighted_aggregate  # noqa: E402

from ._flower_util import (  # noqa: E402
    SHAPES,
    InProcessProxy,
    LinearClient,
    fit_results,
    manager_with,
    random_layers,
)


def _arrays(parameters):
    return parameters_to_ndarrays(parameters)


def _assert_same_layers(ours, theirs, rtol, atol):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _fedavg_metrics(fit_metrics):
    total = sum(n for n, _ in fit_metrics)
    return {"loss": sum(n * m["loss"] for n, m in fit_metrics) / total}


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_equals_flower_fedavg(inplace, dtype, tol):
    rng = np.random.default_rng(0)
    clients = [random_layers(rng, dtype) for _ in range(7)]
    counts = rng.integers(1, 200, size=7)
    results = fit_results(clients, counts)
    ours, m_ours = NativeFedAvg(inplace=inplace).aggregate_fit(1, results, [])
    theirs, m_theirs = FedAvg(inplace=inplace).aggregate_fit(1, fit_results(clients, counts), [])
    _assert_same_layers(_arrays(ours), _arrays(theirs), rtol=tol, atol=tol)
    assert m_ours == m_theirs == {}
    # the formula itself, in float64
    w = counts / counts.sum()
    for j, layer in enumerate(_arrays(ours)):
        expected = sum(w[k] * clients[k][j].astype(np.float64) for k in range(7))
        np.testing.assert_allclose(layer, expected, rtol=tol, atol=tol)
    # the clients' arrays are untouched
    for (_, res), layers in zip(results, clients):
        _assert_same_layers(_arrays(res.parameters), layers, 0, 0)


def test_many_clients_and_a_bigger_model():
    rng = np.random.default_rng(1)
    shapes = [(64, 64), (64,), (64, 10), (10,)]
    clients = [random_layers(rng, np.float32, shapes) for _ in range(50)]
    counts = rng.integers(5, 30, size=50)
    ours, _ = NativeFedAvg().aggregate_fit(3, fit_results(clients, counts), [])
    theirs, _ = FedAvg().aggregate_fit(3, fit_results(clients, counts), [])
    _assert_same_layers(_arrays(ours), _arrays(theirs), rtol=1e-5, atol=1e-6)


def test_integer_layers_are_averaged_as_float64_like_flower_aggregate():
    rng = np.random.default_rng(2)
    clients = [[rng.standard_normal((3, 2)).astype(np.float32), rng.integers(0, 50, size=4)]
               for _ in range(3)]
    counts = [1, 3, 6]
    ours, _ = NativeFedAvg().aggregate_fit(1, fit_results(clients, counts), [])
    expected = aggregate(list(zip(clients, counts)))  # Flower's non-in-place FedAvg
    _assert_same_layers(_arrays(ours), expected, rtol=1e-6, atol=1e-6)
    assert _arrays(ours)[1].dtype == np.float64


def test_metrics_aggregation_like_fedavg():
    rng = np.random.default_rng(3)
    clients = [random_layers(rng) for _ in range(4)]
    counts = [10, 20, 30, 40]
    metrics = [{"loss": float(i)} for i in range(4)]
    kwargs = {"fit_metrics_aggregation_fn": _fedavg_metrics}
    _, ours = NativeFedAvg(**kwargs).aggregate_fit(2, fit_results(clients, counts, metrics), [])
    _, theirs = FedAvg(**kwargs).aggregate_fit(2, fit_results(clients, counts, metrics), [])
    assert ours == theirs == {"loss": pytest.approx(2.0)}


@pytest.mark.parametrize("accept", [True, False])
def test_failures_like_fedavg(accept):
    rng = np.random.default_rng(4)
    clients = [random_layers(rng) for _ in range(3)]
    failures = [RuntimeError("client lost")]
    ours, m_ours = NativeFedAvg(accept_failures=accept).aggregate_fit(
        1, fit_results(clients, [1, 2, 3]), failures)
    theirs, m_theirs = FedAvg(accept_failures=accept).aggregate_fit(
        1, fit_results(clients, [1, 2, 3]), failures)
    if accept:
        _assert_same_layers(_arrays(ours), _arrays(theirs), rtol=1e-5, atol=1e-6)
    else:
        assert ours is None and theirs is None
    assert m_ours == m_theirs == {}
    assert NativeFedAvg().aggregate_fit(1, [], failures) == (None, {})


def test_bad_results_raise_naming_the_client():
    rng = np.random.default_rng(5)
    good = random_layers(rng)
    bad_shape = random_layers(rng, shapes=[(8, 4), (5,), (3, 3, 2), ()])
    with pytest.raises(ValueError, match=r"results\[1\] layer 0 has shape \(8, 4\)"):
        NativeFedAvg().aggregate_fit(1, fit_results([good, bad_shape], [1, 1]), [])
    with pytest.raises(ValueError, match="results\\[1\\] has 3 layers"):
        NativeFedAvg().aggregate_fit(1, fit_results([good, good[:3]], [1, 1]), [])
    with pytest.raises(ValueError, match=r"results\[0\] FitRes.num_examples must be an int >= 0"):
        NativeFedAvg().aggregate_fit(1, fit_results([good, good], [-1, 2]), [])
    with pytest.raises(ValueError, match="num_examples must not be 0 for every client"):
        NativeFedAvg().aggregate_fit(1, fit_results([good, good], [0, 0]), [])


@pytest.mark.parametrize("kwargs,match", [
    ({"clip_norm": 0.0}, "clip_norm must be None or a finite number > 0; got 0.0"),
    ({"clip_norm": float("nan")}, "clip_norm must be None or a finite number > 0"),
    ({"clip_norm": True}, "clip_norm must be None or a finite number > 0"),
    ({"clip_norm": 1.0, "noise_multiplier": -1}, "noise_multiplier must be a finite number >= 0; got -1"),
    ({"noise_multiplier": 1.0}, "needs clip_norm"),
    ({"clip_norm": 1.0, "noise_seed": -3}, "noise_seed must be None or an int"),
])
def test_constructor_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NativeFedAvg(**kwargs)


# -- central DP ------------------------------------------------------------------------------


def _round(strategy, global_layers, clients, counts, server_round=1, failures=()):
    """configure_fit (keeps the global parameters) then aggregate_fit, as Flower's Server does."""
    proxies = [InProcessProxy(str(i), None) for i in range(len(clients))]
    strategy.configure_fit(server_round, ndarrays_to_parameters(global_layers), manager_with(proxies))
    return strategy.aggregate_fit(server_round, fit_results(clients, counts), list(failures))


def _dp_setup(k=6, seed=6, dtype=np.float64, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    global_layers = random_layers(rng, dtype, shapes)
    scales = np.linspace(0.1, 3.0, k)  # some updates inside the ball, some clipped
    clients = [[g + s * u for g, u in zip(global_layers, random_layers(rng, dtype, shapes))]
               for s in scales]
    return global_layers, clients


def test_clipping_equals_flower_server_side_fixed_clipping():
    # no 0-d layer: Flower 1.42's compute_clip_model_update leaves 0-d layers unclipped
    # (np.subtract returns a numpy scalar there, and `array *= factor` rebinds it)
    global_layers, clients = _dp_setup(shapes=SHAPES[:3])
    counts = [10] * len(clients)  # Flower's wrapper keeps FedAvg's weights: equal counts
    c = 2.5
    ours, _ = _round(NativeFedAvg(clip_norm=c, min_fit_clients=6, min_available_clients=6),
                     global_layers, clients, counts)
    flower = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_fit_clients=6, min_available_clients=6), noise_multiplier=0.0,
        clipping_norm=c, num_sampled_clients=len(clients))
    theirs, _ = _round(flower, global_layers, clients, counts)
    _assert_same_layers(_arrays(ours), _arrays(theirs), rtol=1e-10, atol=1e-12)


def test_clipping_formula_and_uniform_weights():
    global_layers, clients = _dp_setup(k=5, seed=7)  # with a 0-d layer, clipped too
    c = 1.5
    counts = [1, 100, 3, 7, 40]  # ignored in DP mode
    ours, _ = _round(NativeFedAvg(clip_norm=c, min_fit_clients=5, min_available_clients=5),
                     global_layers, clients, counts)
    flat_g = np.concatenate([g.ravel() for g in global_layers])
    updates = [np.concatenate([a.ravel() for a in cl]) - flat_g for cl in clients]
    mean = sum(u * min(1.0, c / np.linalg.norm(u)) for u in updates) / len(updates)
    got = np.concatenate([a.ravel() for a in _arrays(ours)])
    np.testing.assert_allclose(got, flat_g + mean, rtol=1e-12, atol=1e-12)
    assert np.linalg.norm(got - flat_g) <= c + 1e-12


def test_noise_std_and_stream():
    rng = np.random.default_rng(8)
    shapes = [(100, 100), (100,)]
    global_layers = random_layers(rng, np.float64, shapes)
    k, c, z = 4, 1.0, 2.0
    clients = [[g + 0.01 * u for g, u in zip(global_layers, random_layers(rng, np.float64, shapes))]
               for _ in range(k)]
    kw = {"clip_norm": c, "min_fit_clients": k, "min_available_clients": k}
    clean, _ = _round(NativeFedAvg(**kw), global_layers, clients, [1] * k)
    strategy = NativeFedAvg(noise_multiplier=z, noise_seed=123, **kw)
    noisy1, _ = _round(strategy, global_layers, clients, [1] * k, server_round=1)
    p = 100 * 100 + 100
    assert strategy.noise_offset == noise_blocks(p)
    noisy2, _ = _round(strategy, global_layers, clients, [1] * k, server_round=2)
    assert strategy.noise_offset == 2 * noise_blocks(p)
    flat = lambda ps: np.concatenate([a.ravel() for a in _arrays(ps)])  # noqa: E731
    n1, n2 = flat(noisy1) - flat(clean), flat(noisy2) - flat(clean)
    std = z * c / k
    # sample std of P = 10,100 normals: relative error ~ 1/sqrt(2P) = 0.7%; 5% is 7 sigma
    assert abs(n1.std() / std - 1) < 0.05 and abs(n2.std() / std - 1) < 0.05
    assert abs(n1.mean()) < 6 * std / np.sqrt(p)
    assert abs(np.corrcoef(n1, n2)[0, 1]) < 6 / np.sqrt(p)  # the second round has fresh noise
    # exactly the op's noise at (seed, offset): reproducible
    g = np.concatenate([a.ravel() for a in global_layers])
    ups = [np.concatenate([a.ravel() for a in cl]) - g for cl in clients]
    mean, _ = weighted_aggregate(ups, np.ones(k), clip_norm=c, noise_std=std, seed=123, offset=0)
    np.testing.assert_allclose(flat(noisy1), g + mean, rtol=0, atol=1e-12)
    again, _ = _round(NativeFedAvg(noise_multiplier=z, noise_seed=123, **kw), global_layers,
                      clients, [1] * k)
    np.testing.assert_array_equal(flat(again), flat(noisy1))


def test_dp_mode_skips_rounds_with_failures_and_needs_configure_fit():
    global_layers, clients = _dp_setup(k=3, seed=9)
    kw = {"clip_norm": 1.0, "noise_multiplier": 1.0, "noise_seed": 1, "min_fit_clients": 3,
          "min_available_clients": 3}
    strategy = NativeFedAvg(accept_failures=True, **kw)
    out = _round(strategy, global_layers, clients, [1, 1, 1], failures=[RuntimeError("lost")])
    assert out == (None, {}) and strategy.noise_offset == 0
    fresh = NativeFedAvg(**kw)
    with pytest.raises(ValueError, match="configure_fit last ran for round None"):
        fresh.aggregate_fit(1, fit_results(clients, [1, 1, 1]), [])
    _round(fresh, global_layers, clients, [1, 1, 1], server_round=1)
    with pytest.raises(ValueError, match="needs round 2's global parameters"):
        fresh.aggregate_fit(2, fit_results(clients, [1, 1, 1]), [])


# -- Flower's own server loop, in process (no Ray) --------------------------------------------


def _run_server(strategy, clients, rounds=3):
    proxies = [InProcessProxy(str(i), c) for i, c in enumerate(clients)]
    server = Server(client_manager=manager_with(proxies), strategy=strategy)
    history, _ = server.fit(num_rounds=rounds, timeout=None)
    return _arrays(server.parameters), history


def test_flower_server_loop_matches_fedavg():
    rng = np.random.default_rng(10)
    true_w = rng.standard_normal((4, 2))
    clients = []
    for n in (5, 9, 13, 21, 30):
        x = rng.standard_normal((n, 4))
        clients.append(LinearClient(x, x @ true_w + 0.1 * rng.standard_normal((n, 2))))
    clients.append(LinearClient(np.zeros((1, 4)), np.zeros((1, 2)), fail=True))
    init = [np.zeros((4, 2), np.float32), np.zeros(2, np.float32)]

    def strategy(cls):
        return cls(min_fit_clients=6, min_evaluate_clients=5, min_available_clients=6,
                   initial_parameters=ndarrays_to_parameters(init),
                   fit_metrics_aggregation_fn=_fedavg_metrics)

    ours, h_ours = _run_server(strategy(NativeFedAvg), clients)
    theirs, h_theirs = _run_server(strategy(FedAvg), clients)
    _assert_same_layers(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours[0], 0)  # it trained
    losses = [l for _, l in h_ours.losses_distributed]
    assert len(losses) == 3 and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, [l for _, l in h_theirs.losses_distributed], rtol=1e-5)
    fit_loss = [v for _, v in h_ours.metrics_distributed_fit["loss"]]
    np.testing.assert_allclose(fit_loss, [v for _, v in h_theirs.metrics_distributed_fit["loss"]],
                               rtol=1e-5)


def test_reads_flower_bytes_in_place():
    from flwr.common import ndarray_to_bytes

    from ppml_fast.integrations.flower import _npy_view

    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(3.5), np.zeros((0, 3)),
              np.arange(5, dtype=np.int16), np.asfortranarray(np.arange(6.0).reshape(2, 3))]
    for a in arrays:
        v = _npy_view(ndarray_to_bytes(a))
        assert v.shape == a.shape and v.dtype == a.dtype
        np.testing.assert_array_equal(v, a)
    assert not _npy_view(ndarray_to_bytes(arrays[0])).flags.writeable  # a view of the bytes
    # Fortran-ordered layers (np.load's path) aggregate like FedAvg too
    rng = np.random.default_rng(11)
    clients = [[np.asfortranarray(rng.standard_normal((4, 3))), rng.standard_normal(3)] for _ in range(3)]
    ours, _ = NativeFedAvg().aggregate_fit(1, fit_results(clients, [2, 5, 1]), [])
    theirs, _ = FedAvg().aggregate_fit(1, fit_results(clients, [2, 5, 1]), [])
    _assert_same_layers(_arrays(ours), _arrays(theirs), rtol=1e-12, atol=1e-12)
