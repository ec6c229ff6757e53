"""Nothing lost when a run stops (issue 18 item 3): the exception that ends run_simulation
carries the completed rounds as ``.history``; ``history_path`` holds them on disk, written
atomically after every round."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ppml_fast.federated import FedAvg, Simulation, run_simulation
from ppml_fast.federated.history_writer import write_history
from ppml_fast.federated.secagg.errors import SecAggError

from ._sim_helpers import make_clients, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


class FailsAt(FedAvg):
    def __init__(self, rnd, exc):
        super().__init__()
        self.rnd, self.exc = rnd, exc

    def aggregate_fit(self, server_round, parameters, results, failures):
        if server_round == self.rnd:
            raise self.exc
        return super().aggregate_fit(server_round, parameters, results, failures)


def _run(strategy, **kw):
    return run_simulation(tiny_model, make_clients(6), strategy, rounds=5, clients_per_round=3,
                          lr=0.2, batch_size=8, progress=False, **kw)


@pytest.mark.parametrize("exc", [RuntimeError("strategy broke"), SecAggError("too few survivors"),
                                 KeyboardInterrupt()])
def test_the_exception_carries_the_completed_rounds(tmp_path, exc):
    path = tmp_path / "h.json"
    with pytest.raises(type(exc)) as info:
        _run(FailsAt(3, exc), history_path=str(path))
    h = info.value.history
    assert [r["round"] for r in h.rounds] == [1, 2] and h.stopped == "error"
    assert h.stop_message.startswith(f"round 3: {type(exc).__name__}")
    # the same rounds as a run that was not interrupted, and the parameters after round 2
    ref = run_simulation(tiny_model, make_clients(6), FedAvg(), rounds=2, clients_per_round=3, lr=0.2,
                         batch_size=8, progress=False)
    assert h.to_dict(times=False)["rounds"] == ref.to_dict(times=False)["rounds"]
    assert torch.equal(h.parameters, ref.parameters)
    on_disk = json.loads(path.read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2] and on_disk["stopped"] == "error"
    assert [f for f in os.listdir(tmp_path)] == ["h.json"]  # no temporary file left behind


def test_history_path_is_written_after_every_round(tmp_path):
    path = tmp_path / "run.json"
    with Simulation(tiny_model, make_clients(6), FedAvg(), rounds=3, clients_per_round=3, lr=0.2,
                    batch_size=8, progress=False, history_path=path) as sim:
        assert not path.exists()
        for rnd in (1, 2, 3):
            sim.step()
            d = json.loads(path.read_text())
            assert len(d["rounds"]) == rnd and d == json.loads(sim.history.to_json())
    h = _run(FedAvg(), history_path=path)
    assert json.loads(path.read_text()) == json.loads(h.to_json()) and h.stopped == "rounds"


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "h.json"
    h = _run(FedAvg(), history_path=path)
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    h.rounds.append(dict(h.rounds[-1], round=6))
    with pytest.raises(OSError, match="disk full"):
        write_history(h, path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["h.json"]


def test_history_path_checked_before_the_run(tmp_path):
    with pytest.raises(ValueError, match="history_path: directory"):
        _run(FedAvg(), history_path=tmp_path / "missing" / "h.json")
    with pytest.raises(ValueError, match="history_path must name a file"):
        _run(FedAvg(), history_path=tmp_path)
    with pytest.raises(TypeError, match="history_path"):
        _run(FedAvg(), history_path=3)
