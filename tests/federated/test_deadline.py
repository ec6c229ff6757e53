"""Deadlines that hold (issue 18 item 4): a client whose fit hangs is abandoned at
``client_timeout`` and dropped with reason "timeout" (sequential and vectorized backends); the
abandoned fit never reaches the round, not even through the scratch model it was lent; under
local DP its spend is counted as if its fit had completed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ppml_fast.federated import Client, FedAvg, LocalDP, run_simulation
from ppml_fast.federated.dp.local import state_after_lost_fit

from ._sim_helpers import RaisingClient, make_clients, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


def _data(c):
    return torch.utils.data.TensorDataset(c._x, c._y)


class Hangs(Client):
    """A fit that sleeps for an hour, unless ``release`` is set (the test's cleanup)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.release = threading.Event()

    def fit(self, parameters, config):
        self.release.wait(3600)
        return super().fit(parameters, config)


class WakesAndScribbles(Client):
    """Misses the deadline, then writes NaN into the scratch model it was lent (while the round
    trains the next clients) and returns a huge update."""

    def fit(self, parameters, config):
        model = config["model"]
        time.sleep(0.4)
        end = time.perf_counter() + 0.8
        while time.perf_counter() < end:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
            time.sleep(0.001)
        res = super().fit(parameters, config)
        return type(res)(res.update + 1e6, res.num_examples, res.metrics)


class SlowGood(Client):
    def fit(self, parameters, config):
        time.sleep(0.15)
        return super().fit(parameters, config)


def _run(clients, backend="sequential", **kw):
    kw = {"rounds": 2, "clients_per_round": len(clients), "lr": 0.2, "batch_size": 8, "progress": False,
          "backend": backend, **kw}
    return run_simulation(tiny_model, clients, FedAvg(), **kw)


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_an_hour_long_fit_is_abandoned_at_the_deadline(backend):
    base = make_clients(4)
    hung = Hangs(_data(base[0]))
    clients = [hung] + base[1:]
    start = time.perf_counter()
    try:
        h = _run(clients, backend, client_timeout=2.0)  # vectorized: its first chunk compiles
    finally:
        hung.release.set()  # let the abandoned thread end with the test
    assert time.perf_counter() - start < 20  # two rounds, not an hour
    for row in h.rounds:  # round 2: its abandoned fit still runs, so it is dropped at once
        assert row["dropped"] == [{"cid": 0, "reason": "timeout"}] and row["clients"] == [1, 2, 3]
    ref = _run([RaisingClient(_data(base[0]))] + make_clients(4)[1:], backend)
    assert torch.equal(h.parameters, ref.parameters)  # the hung client changed nothing


def test_an_abandoned_fit_cannot_write_into_the_round():
    base = make_clients(4)
    clients = [WakesAndScribbles(_data(base[0]))] + [SlowGood(_data(c)) for c in base[1:]]
    h = _run(clients, rounds=1, client_timeout=0.25)
    assert h.rounds[0]["dropped"] == [{"cid": 0, "reason": "timeout"}]
    ref = _run([RaisingClient(_data(base[0]))] + [SlowGood(_data(c)) for c in make_clients(4)[1:]], rounds=1)
    assert torch.isfinite(h.parameters).all() and torch.equal(h.parameters, ref.parameters)


class DPHangsBefore(Hangs):
    def fit(self, parameters, config):
        self.release.wait(3600)
        return super().fit(parameters, config)


class DPHangsAfter(Client):
    def fit(self, parameters, config):
        res = super().fit(parameters, config)
        time.sleep(1.0)
        return res


@pytest.mark.parametrize("kind", [DPHangsBefore, DPHangsAfter])
def test_a_timed_out_local_dp_client_counts_its_whole_fit(kind):
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    base = make_clients(4)
    slow = kind(_data(base[0]))
    try:
        h = _run([slow] + base[1:], rounds=1, client_timeout=0.3, local_dp=dp, batch_size=10)
    finally:
        if kind is DPHangsBefore:
            slow.release.set()
    bound = state_after_lost_fit(None, dp, slow.num_examples, 10, 1).epsilon(dp.delta)
    entry = h.rounds[0]["dropped"][0]
    assert entry["cid"] == 0 and entry["reason"] == "timeout"
    assert entry["epsilon"] == pytest.approx(bound, rel=1e-12)  # released nothing, counted in full
    others = [Client.local_epsilon(c, dp.delta) for c in base[1:]]
    assert h.rounds[0]["epsilon"] == pytest.approx(max([bound] + others))
    if kind is DPHangsAfter:  # its own accountant, once the fit ended, says no more than the bound
        time.sleep(1.0)
        assert slow.local_epsilon(dp.delta) <= bound * (1 + 1e-12)


class Interrupts(Client):
    def fit(self, parameters, config):
        raise KeyboardInterrupt


def test_an_interrupt_inside_a_fit_stops_the_run_with_its_history():
    base = make_clients(4)
    with pytest.raises(KeyboardInterrupt) as info:
        _run(base[:3] + [Interrupts(_data(base[3]))], client_timeout=5.0)
    assert info.value.history.stopped == "error" and info.value.history.rounds == []
