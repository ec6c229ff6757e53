"""SecAggFedAvg: the secure aggregate equals FedAvg's within the stated quantisation bound, in
``aggregate_fit`` and through ``run_simulation`` (with dropouts recovered, and a clear error or a
skipped round beyond the threshold), and around DP-FedAvg it gives DP-FedAvg's model and epsilon
with the clients clipping their own updates; bad arguments raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast.federated import DPFedAvgFixed, FedAvg, FitResult, run_simulation
from ppml_fast.federated.dp import DPFedAvgAdaptive
from ppml_fast.federated.secagg import SecAggAborted, SecAggError, SecAggFedAvg
from ppml_fast.federated.types import ClientProxy

from ._sim_helpers import make_clients, tiny_model


def _results(k: int, p: int, seed: int) -> list[tuple[ClientProxy, FitResult]]:
    gen = torch.Generator().manual_seed(seed)
    return [(ClientProxy(c), FitResult(update=torch.randn(p, generator=gen) * 0.3,
                                       num_examples=int(torch.randint(1, 50, (1,), generator=gen))))
            for c in range(k)]


@pytest.mark.parametrize("max_weight", [None, 64])
def test_aggregate_equals_fedavg_within_bound(max_weight):
    p = 500
    results = _results(6, p, seed=0)
    params = torch.zeros(p)
    strategy = SecAggFedAvg(clip_range=2.0, max_weight=max_weight, seed=1)
    new, metrics = strategy.aggregate_fit(1, params, results, [])
    if max_weight is None:
        expected = torch.stack([r.update for _, r in results]).double().mean(0)
        denominator = len(results)
    else:
        expected, _ = FedAvg().aggregate_fit(1, params.double(), results, [])
        denominator = sum(r.num_examples for _, r in results)
    assert metrics["secagg_survivors"] == 6 and metrics["secagg_dropped"] == 0
    # the mean's error: the sum's bound over the weight sum, plus float32 rounding of the result
    bound = metrics["secagg_error_bound"] / denominator + 1e-6
    assert float((new.double() - expected).abs().max()) < bound


def test_failed_clients_are_dropouts_and_recovered():
    p = 64
    results = _results(7, p, seed=2)
    strategy = SecAggFedAvg(clip_range=2.0, seed=3)
    failures = [(ClientProxy(7), "timeout"), (ClientProxy(8), "RuntimeError: boom")]
    new, metrics = strategy.aggregate_fit(1, torch.zeros(p), results, failures)
    assert metrics["secagg_survivors"] == 7 and metrics["secagg_dropped"] == 2
    expected = torch.stack([r.update for _, r in results]).double().mean(0)
    assert float((new.double() - expected).abs().max()) < metrics["secagg_error_bound"] / 7 + 1e-6
    # 7 of 12 left: below t = 9 (threshold 2/3); without the retry the round aborts
    too_many = failures + [(ClientProxy(c), "timeout") for c in range(9, 12)]
    raising = SecAggFedAvg(clip_range=2.0, seed=3, reconstruction_threshold=0.7, retry=False,
                           on_abort="raise")
    with pytest.raises(SecAggError, match="below the threshold") as info:
        raising.aggregate_fit(2, torch.zeros(p), results, too_many)
    assert not isinstance(info.value, SecAggAborted)
    skipping = SecAggFedAvg(clip_range=2.0, seed=3, reconstruction_threshold=0.7, retry=False)
    with pytest.raises(SecAggAborted, match="round 2 aborted: .*below the threshold") as info:
        skipping.aggregate_fit(2, torch.ones(p), results, too_many)
    assert info.value.metrics == {"secagg_aborted": 1.0}
    # with the retry (the default) the 7 survivors run the protocol again and are summed
    retrying = SecAggFedAvg(clip_range=2.0, seed=3, reconstruction_threshold=0.7)
    new, metrics = retrying.aggregate_fit(2, torch.zeros(p), results, too_many)
    assert metrics["secagg_retried"] == 1.0 and metrics["secagg_survivors"] == 7
    assert float((new.double() - expected).abs().max()) < metrics["secagg_error_bound"] / 7 + 1e-6


def test_run_simulation_with_dropouts_matches_fedavg():
    clients = make_clients(8)
    kw = dict(rounds=3, clients_per_round=6, seed=1, progress=False, dropout=0.2, lr=0.1)
    plain = run_simulation(tiny_model, clients, FedAvg(), **kw)
    secure = run_simulation(tiny_model, clients,
                            SecAggFedAvg(clip_range=1.0, max_weight=1000, reconstruction_threshold=0.51,
                                         seed=0), **kw)
    dropped = [m["metrics"].get("secagg_dropped", 0) for m in secure.rounds]
    assert sum(dropped) > 0 and [r["clients"] for r in secure.rounds] == [r["clients"] for r in plain.rounds]
    assert torch.allclose(secure.parameters, plain.parameters, atol=1e-5, rtol=0)


def test_run_simulation_fails_clearly_beyond_the_threshold():
    clients = make_clients(8)
    strategy = SecAggFedAvg(clip_range=1.0, seed=0, reconstruction_threshold=0.7, retry=False,
                            on_abort="raise")
    with pytest.raises(SecAggError, match="below the threshold"):
        run_simulation(tiny_model, clients, strategy, rounds=2,
                       clients_per_round=6, seed=1, progress=False, dropout=0.5)


def test_composes_with_dp_fedavg():
    clients = make_clients(8)
    kw = dict(rounds=2, clients_per_round=6, seed=4, progress=False, lr=0.1, delta=1e-5)

    def dp():
        return DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.2, sampling_rate=6 / 8,
                             seed=8)  # a noise seed: both runs draw the same noise

    plain = run_simulation(tiny_model, clients, dp(), **kw)
    strategy = SecAggFedAvg(dp(), seed=5)
    secure = run_simulation(tiny_model, clients, strategy, **kw)
    assert [r["epsilon"] for r in secure.rounds] == [r["epsilon"] for r in plain.rounds]
    assert all(r["metrics"]["dp_noise_std"] == pytest.approx(1.0 * 0.2 / 6) for r in secure.rounds)
    # same noise (same seed); the sums differ by the quantisation only
    assert torch.allclose(secure.parameters, plain.parameters, atol=1e-5, rtol=0)
    assert strategy.strategy.last_update_norms.numel() == 0  # the server never saw an update


def test_dp_clients_clip_so_that_encoded_updates_stay_within_the_norm():
    p = 300
    results = [(ClientProxy(c), FitResult(update=torch.full((p,), 5.0), num_examples=1)) for c in range(3)]
    dp = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5)
    strategy = SecAggFedAvg(dp, seed=6)
    inputs, weights = strategy._client_inputs(results, p, 0.5, bits=12)
    for u in inputs.values():
        norm = float(torch.linalg.vector_norm(u))
        step = 2 * 0.5 / (2**12 - 1)
        assert norm + np.sqrt(p) * step <= 0.5 + 1e-12  # rounding cannot push it past C
    assert set(weights.values()) == {1}


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((), {}, ValueError, "clip_range is required"),
    ((), dict(clip_range=0.0), ValueError, "clip_range must be a finite number > 0"),
    ((), dict(clip_range=1.0, reconstruction_threshold=0.5), ValueError, r"fraction in \(0.5, 1\]"),
    ((), dict(clip_range=1.0, neighbours=3), ValueError, "even int >= 2"),
    ((), dict(clip_range=1.0, max_weight=0), ValueError, "max_weight must be None or an int >= 1"),
    ((), dict(clip_range=1.0, on_abort="ignore"), ValueError, "on_abort must be 'raise' or 'skip'"),
    (("fedavg",), dict(clip_range=1.0), TypeError, "strategy must be a ppml_fast.federated.Strategy"),
])
def test_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        SecAggFedAvg(*args, **kwargs)


def test_bad_dp_combinations():
    def dp():
        return DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=0.5)

    with pytest.raises(ValueError, match="clip_range must be None with DP-FedAvg"):
        SecAggFedAvg(dp(), clip_range=1.0)
    with pytest.raises(ValueError, match="max_weight must be None with DP-FedAvg"):
        SecAggFedAvg(dp(), max_weight=10)
    with pytest.raises(ValueError, match="retry must be True with DP-FedAvg"):
        SecAggFedAvg(dp(), retry=False)
    adaptive = DPFedAvgAdaptive(FedAvg(), noise_multiplier=1.0, initial_clip_norm=0.5,
                                clipped_count_stddev=2.0)
    with pytest.raises(ValueError, match="must not be DPFedAvgAdaptive"):
        SecAggFedAvg(adaptive)
