"""run_simulation: the History, reproducibility, dropout and every fault kind, skipped rounds,
the stop rules, local-DP epsilon, federated evaluation and bad arguments."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from ppml_fast.datasets import synthetic_classification
from ppml_fast.federated import Client, ClientProxy, FedAvg, History, ParameterLayout, run_simulation
from ppml_fast.federated.backends import Outcome
from ppml_fast.federated.simulation import Simulation, _fault
from ppml_fast.federated.types import FitResult

from ._sim_helpers import (BudgetClient, InfClient, NaNClient, RaisingClient, ShapeClient, SlowClient,
                           eval_set, make_clients, tiny_model)

@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    """Tiny models: torch's thread pool only adds contention on a shared 2-core machine."""
    torch.set_num_threads(1)


ROW_KEYS = {"round", "loss", "accuracy", "epsilon", "clients", "dropped", "skipped", "skip_reason",
            "excluded", "train_loss", "metrics", "federated", "seconds"}


def _run(clients=None, strategy=None, **kw):
    kw = {"rounds": 3, "clients_per_round": 4, "lr": 0.2, "batch_size": 8, "progress": False, **kw}
    return run_simulation(tiny_model, make_clients() if clients is None else clients,
                          strategy or FedAvg(), **kw)


class CountingDP(FedAvg):
    """A fake privacy-spending strategy: epsilon = per_round x (aggregated rounds + rounds_ahead)."""

    def __init__(self, per_round: float) -> None:
        super().__init__()
        self.per_round, self.done = per_round, 0

    def aggregate_fit(self, server_round, parameters, results, failures):
        self.done += 1
        return super().aggregate_fit(server_round, parameters, results, failures)

    def epsilon(self, delta, *, rounds_ahead=0):
        return self.per_round * (self.done + rounds_ahead)


class EmptyOK(FedAvg):
    """Aggregates even an empty round (parameters unchanged then)."""

    def __init__(self):
        super().__init__()
        self.min_fit_clients, self.calls = 0, 0

    def aggregate_fit(self, server_round, parameters, results, failures):
        self.calls += 1
        return (parameters, {}) if not results else super().aggregate_fit(server_round, parameters, results,
                                                                          failures)


class Recording(FedAvg):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.failures, self.results = [], []

    def aggregate_fit(self, server_round, parameters, results, failures):
        self.results.append([p.cid for p, _ in results])
        self.failures.append(sorted((p.cid, r) for p, r in failures))
        return super().aggregate_fit(server_round, parameters, results, failures)


# --------------------------------------------------------------------------- History


def test_history_rows_json_and_final_model():
    h = _run(eval_dataset=eval_set())
    assert isinstance(h, History) and len(h.rounds) == 3 and h.stopped == "rounds"
    for i, row in enumerate(h.rounds, 1):
        assert set(row) == ROW_KEYS and row["round"] == i
        assert row["epsilon"] is None and row["skipped"] is False and row["dropped"] == []
        assert len(row["clients"]) == 4 and 0 <= row["accuracy"] <= 1 and math.isfinite(row["loss"])
        assert row["seconds"] > 0 and math.isfinite(row["train_loss"])
    d = json.loads(h.to_json())
    assert d["rounds"][0]["clients"] == h.rounds[0]["clients"] and d["stopped"] == "rounds"
    assert "seconds" not in h.to_dict(times=False)["rounds"][0]
    assert d["settings"]["backend"] == "sequential" and d["settings"]["num_clients"] == 8
    model = h.final_model()
    assert torch.equal(ParameterLayout.of(model).flatten(model), h.parameters)
    assert h.accuracy == h.rounds[-1]["accuracy"] and h.epsilon is None


def test_history_json_is_strict_with_infinite_epsilon():
    # noise multiplier 0 spends epsilon = inf: written as "inf", never as non-standard Infinity
    h = History(rounds=[{"round": 1, "epsilon": math.inf, "loss": math.nan, "dropped": []}])

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    d = json.loads(h.to_json(), parse_constant=refuse)
    assert d["rounds"][0]["epsilon"] == "inf" and d["rounds"][0]["loss"] == "nan"
    assert h.rounds[0]["epsilon"] == math.inf  # the History itself is unchanged


def test_same_seed_same_history_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = _run(seed=3, dropout=0.3, eval_dataset=eval_set())
    assert torch.equal(torch.get_rng_state(), state)
    b = _run(seed=3, dropout=0.3, eval_dataset=eval_set())
    assert a.to_dict(times=False) == b.to_dict(times=False)
    assert torch.equal(a.parameters, b.parameters)
    c = _run(seed=4, dropout=0.3, eval_dataset=eval_set())
    assert not torch.equal(a.parameters, c.parameters)


def test_round_changes_parameters_by_fedavg_of_the_clients():
    """One round by hand: the clients' fits with the simulation's configs, FedAvg'd."""
    clients = make_clients()
    h = _run(clients, rounds=1, clients_per_round=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_model()
    layout = ParameterLayout.of(model)
    p0 = layout.flatten(model)
    seeds = np.random.default_rng([0, 1, 2]).integers(0, 2**63 - 1, 8)
    total, acc = 0, torch.zeros_like(p0)
    for i, c in enumerate(clients):
        r = c.fit(p0, {"model": tiny_model(), "lr": 0.2, "batch_size": 8, "seed": int(seeds[i])})
        acc += r.update * r.num_examples
        total += r.num_examples
    torch.testing.assert_close(h.parameters, p0 + acc / total, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dropout and faults


def test_dropout_is_seeded_and_reported():
    h = _run(rounds=6, clients_per_round=8, dropout=0.5, seed=1)
    dropped = [d for r in h.rounds for d in r["dropped"]]
    assert dropped and all(d["reason"] == "dropout" for d in dropped)
    assert 0.25 < len(dropped) / 48 < 0.75  # 48 draws with p = 0.5: fails with prob < 1e-3
    for r in h.rounds:
        assert sorted(r["clients"] + [d["cid"] for d in r["dropped"]]) == list(range(8))
    again = _run(rounds=6, clients_per_round=8, dropout=0.5, seed=1)
    assert [r["dropped"] for r in again.rounds] == [r["dropped"] for r in h.rounds]


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_every_fault_is_left_out_with_its_reason(backend):
    data = make_clients(8)
    kinds = [RaisingClient, BudgetClient, NaNClient, InfClient, ShapeClient]
    clients = [cls(c_data_x_y(c)) for cls, c in zip(kinds, data[:5])] + data[5:]
    strategy = Recording()
    h = _run(clients, strategy, rounds=2, clients_per_round=8, backend=backend)
    expected = [(0, "RuntimeError: boom"), (1, "budget"), (2, "nonfinite"), (3, "nonfinite"), (4, "shape")]
    for row in h.rounds:
        assert sorted((d["cid"], d["reason"]) for d in row["dropped"]) == expected
        assert row["clients"] == [5, 6, 7] and not row["skipped"]
    assert strategy.failures == [expected, expected] and strategy.results == [[5, 6, 7]] * 2
    assert torch.isfinite(h.parameters).all()


def c_data_x_y(client):
    return torch.utils.data.TensorDataset(client._x, client._y)


def test_straggler_past_the_deadline_is_discarded():
    clients = make_clients(4)
    slow = SlowClient(c_data_x_y(clients[0]))
    slow.delay = 1.2
    strategy = Recording()
    h = _run([slow] + clients[1:], strategy, rounds=1, clients_per_round=4, client_timeout=1.0)
    assert h.rounds[0]["dropped"] == [{"cid": 0, "reason": "timeout"}]
    assert h.rounds[0]["clients"] == [1, 2, 3] and strategy.failures == [[(0, "timeout")]]


def test_fault_classification_order():
    good = FitResult(torch.zeros(5), 3)
    assert _fault(Outcome(good, None, 0.1), 5, None) is None
    assert _fault(Outcome(good, None, 2.0), 5, 1.0) == "timeout"
    assert _fault(Outcome(good, None, 0.5), 5, 1.0) is None
    assert _fault(Outcome(good, None, 0.1), 6, None) == "shape"
    assert _fault(Outcome(None, ValueError("bad"), 0.1), 5, None) == "ValueError: bad"
    nan = FitResult(torch.tensor([0.0, float("nan")]), 3)
    assert _fault(Outcome(nan, None, 0.1), 2, None) == "nonfinite"


def test_round_skipped_when_too_few_results():
    clients = make_clients(4)
    failing = [RaisingClient(c_data_x_y(c)) for c in clients[:3]] + clients[3:]
    h = _run(failing, rounds=2, clients_per_round=4, min_clients=2, eval_dataset=eval_set())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tiny_model()
    p0 = ParameterLayout.of(model).flatten(model)
    assert torch.equal(h.parameters, p0)
    for row in h.rounds:
        assert row["skipped"] and "1 result(s)" in row["skip_reason"] and "2 required" in row["skip_reason"]
        assert row["clients"] == [3] and len(row["dropped"]) == 3 and row["accuracy"] is not None
    # the strategy's own minimum counts too
    h2 = _run(clients, FedAvg(min_fit_clients=5), rounds=1, clients_per_round=4)
    assert h2.rounds[0]["skipped"] and "min_fit_clients=5" in h2.rounds[0]["skip_reason"]
    # a strategy that accepts an empty round (min_fit_clients = 0, as the DP wrappers): every
    # client dropped out, the round is still aggregated (by default and with min_clients=0) ...
    for kw in ({}, {"min_clients": 0}):
        empty = EmptyOK()
        h3 = _run(clients, empty, rounds=1, clients_per_round=4, dropout=1.0, **kw)
        assert not h3.rounds[0]["skipped"] and h3.rounds[0]["clients"] == [] and empty.calls == 1
    # ... and skipped when the caller asks for at least one result
    h4 = _run(clients, EmptyOK(), rounds=1, clients_per_round=4, dropout=1.0, min_clients=1)
    assert h4.rounds[0]["skipped"] and len(h4.rounds[0]["dropped"]) == 4


# --------------------------------------------------------------------------- stop rules


def test_stops_at_target_accuracy():
    h = _run(rounds=30, clients_per_round=8, lr=0.5, eval_dataset=eval_set(), target_accuracy=0.6)
    assert h.stopped == "target_accuracy" and len(h.rounds) < 30
    assert h.rounds[-1]["accuracy"] >= 0.6 and all(r["accuracy"] < 0.6 for r in h.rounds[:-1])
    assert "target_accuracy" in h.stop_message


def test_stops_before_the_round_that_would_pass_max_epsilon():
    h = _run(None, CountingDP(1.0), rounds=10, max_epsilon=3.5, delta=1e-6)
    assert h.stopped == "max_epsilon" and len(h.rounds) == 3
    assert [r["epsilon"] for r in h.rounds] == [1.0, 2.0, 3.0]
    assert "before round 4" in h.stop_message and "4" in h.stop_message


def test_max_epsilon_with_the_dp_fedavg_wrapper():
    from ppml_fast.federated.dp import fixed
    def dp():
        return fixed.DPFedAvgFixed(FedAvg(), noise_multiplier=2.0, clip_norm=1.0, sampling_rate=0.5)

    ahead = [dp().epsilon(1e-5, rounds_ahead=k) for k in (3, 4)]
    strategy = dp()
    h = _run(make_clients(8), strategy, rounds=10, clients_per_round=4, max_epsilon=sum(ahead) / 2)
    assert h.stopped == "max_epsilon" and len(h.rounds) == 3 and h.settings["delta"] == 1e-5
    eps = [r["epsilon"] for r in h.rounds]
    assert all(a < b for a, b in zip(eps, eps[1:])) and eps[-1] == pytest.approx(ahead[0])


def test_max_epsilon_needs_a_privacy_spending_strategy():
    with pytest.raises(ValueError, match="max_epsilon"):
        _run(max_epsilon=1.0)


def test_local_dp_epsilon_and_budget():
    from ppml_fast.federated.dp import local
    dp = local.LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    h = _run(make_clients(4), rounds=2, clients_per_round=4, local_dp=dp)
    eps = [r["epsilon"] for r in h.rounds]
    assert 0 < eps[0] < eps[1]
    # a budget between the first and the second round's epsilon: every client refuses round 2
    limited = local.LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                            max_epsilon=(eps[0] + eps[1]) / 2)
    h2 = _run(make_clients(4), rounds=2, clients_per_round=4, local_dp=limited)
    assert h2.rounds[0]["epsilon"] == pytest.approx(eps[0]) and not h2.rounds[0]["skipped"]
    assert h2.rounds[1]["skipped"] and {d["reason"] for d in h2.rounds[1]["dropped"]} == {"budget"}
    with pytest.raises(ValueError, match="local_dp"):
        _run(local_dp=dp, backend="vectorized")
    with pytest.raises(TypeError, match="local_dp"):
        _run(local_dp={"noise_multiplier": 1.0})


# --------------------------------------------------------------------------- evaluation, progress


class EvaluatingFedAvg(FedAvg):
    def configure_evaluate(self, server_round, parameters, clients, num_clients, rng):
        return [(c, {}) for c in clients[:3]]


def test_federated_evaluation_is_the_weighted_mean_of_client_evaluations():
    clients = make_clients(6, n=130)
    h = _run(clients, EvaluatingFedAvg(), rounds=1)
    fed = h.rounds[0]["federated"]
    model = tiny_model()
    evs = [c.evaluate(h.parameters, {"model": model}) for c in clients[:3]]
    total = sum(e.num_examples for e in evs)
    assert fed["loss"] == pytest.approx(sum(e.loss * e.num_examples for e in evs) / total)
    assert fed["metrics"]["accuracy"] == pytest.approx(
        sum(e.metrics["accuracy"] * e.num_examples for e in evs) / total)
    assert fed["failures"] == []


def test_eval_every_and_last_round():
    h = _run(rounds=5, eval_every=2, eval_dataset=eval_set())
    assert [r["accuracy"] is not None for r in h.rounds] == [False, True, False, True, True]


def test_progress_bar_and_missing_tqdm(capsys, monkeypatch):
    _run(rounds=2, progress=True)
    assert "federated rounds" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    h = _run(rounds=2, progress=True)
    assert len(h.rounds) == 2 and "federated rounds" not in capsys.readouterr().err


def test_client_ids_from_clients_and_positions():
    data = synthetic_classification(60, features=6, classes=3, seed=1)
    a = Client(torch.utils.data.Subset(data, range(30)), cid=7)
    b = Client(torch.utils.data.Subset(data, range(30, 60)))
    h = _run([a, b], rounds=1, clients_per_round=2)
    assert sorted(h.rounds[0]["clients"]) == [1, 7]
    with pytest.raises(ValueError, match="cid 1"):
        _run([Client(data, cid=1), b], rounds=1, clients_per_round=2)


def test_unknown_client_from_the_strategy_is_an_error():
    class Rogue(FedAvg):
        def configure_fit(self, server_round, parameters, clients, num_clients, rng):
            return [(ClientProxy(99), {})]

    with pytest.raises(ValueError, match="unknown client"):
        _run(strategy=Rogue())


def test_synthetic_classification_is_seeded():
    a, b = synthetic_classification(50, seed=2), synthetic_classification(50, seed=2)
    assert torch.equal(a.tensors[0], b.tensors[0]) and a.tensors[0].shape == (50, 64)
    assert a.tensors[1].dtype == torch.int64 and int(a.tensors[1].max()) < 10
    assert not torch.equal(a.tensors[0], synthetic_classification(50, seed=3).tensors[0])
    with pytest.raises(ValueError, match="features"):
        synthetic_classification(5, features=0)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kw, exc, name", [
    ({"rounds": 0}, ValueError, "rounds"),
    ({"rounds": 1.5}, TypeError, "rounds"),
    ({"clients_per_round": 0}, ValueError, "clients_per_round"),
    ({"clients_per_round": 9}, ValueError, "clients_per_round"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"local_epochs": 0}, ValueError, "local_epochs"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": float("nan")}, TypeError, "lr"),
    ({"dropout": 1.5}, ValueError, "dropout"),
    ({"seed": -1}, ValueError, "seed"),
    ({"target_accuracy": 0.5}, ValueError, "target_accuracy"),
    ({"target_accuracy": 1.5, "eval_dataset": eval_set()}, ValueError, "target_accuracy"),
    ({"max_epsilon": -1.0}, ValueError, "max_epsilon"),
    ({"delta": 1.0}, ValueError, "delta"),
    ({"eval_every": 0}, ValueError, "eval_every"),
    ({"min_clients": -1}, ValueError, "min_clients"),
    ({"client_timeout": 0}, ValueError, "client_timeout"),
    ({"eval_dataset": [1, 2]}, TypeError, "eval_dataset"),
])
def test_bad_arguments_name_the_argument(kw, exc, name):
    with pytest.raises(exc, match=name):
        _run(**kw)


def test_bad_positional_arguments():
    with pytest.raises(ValueError, match="clients"):
        run_simulation(tiny_model, [], FedAvg(), rounds=1, clients_per_round=1)
    with pytest.raises(TypeError, match=r"clients\[1\]"):
        run_simulation(tiny_model, [make_clients(2)[0], "x"], FedAvg(), rounds=1, clients_per_round=1)
    with pytest.raises(TypeError, match="strategy"):
        run_simulation(tiny_model, make_clients(2), object(), rounds=1, clients_per_round=1)
    with pytest.raises(TypeError, match="model_fn"):
        run_simulation(None, make_clients(2), FedAvg(), rounds=1, clients_per_round=1)


def test_simulation_steps_one_round_at_a_time():
    with Simulation(tiny_model, make_clients(), FedAvg(), rounds=2, clients_per_round=3, lr=0.2,
                    batch_size=8, progress=False) as sim:
        first = sim.step()
        assert first["round"] == 1 and sim.history.rounds == [first]
        assert torch.equal(sim.history.parameters, sim.parameters)
        assert sim.step()["round"] == 2 and sim.step() is None and sim.done
    assert sim.backend is None  # closed
    ref = _run(rounds=2, clients_per_round=3)
    assert sim.history.to_dict(times=False) == ref.to_dict(times=False)
    assert torch.equal(sim.history.parameters, ref.parameters)
