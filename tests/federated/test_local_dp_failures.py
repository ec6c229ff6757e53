"""Local DP when a client fails mid-fit: the noisy steps it took before raising stay composed in
its own accountant (also on its first fit), the backend reports that spend with the failure, the
History's epsilon and the client's ``dropped`` entry show it, and the client's own budget
(``LocalDP.max_epsilon``) counts it in its next fit. Ray: test_backends_ray.py."""

from __future__ import annotations

import pytest
import torch

from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent
from ppml_fast.federated import Client, FedAvg, LocalDP, run_simulation
from ppml_fast.federated.backends import SequentialBackend
from ppml_fast.federated.backends.base import failed_client_epsilon, fit_one
from ppml_fast.federated.dp.local import LocalDPState, local_dp_steps, state_after_lost_fit

from ._sim_helpers import FailsAfterSteps, make_clients, tiny_model

SIGMA, DELTA = 1.0, 1e-5


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


def _full_batch_eps(steps: int) -> float:
    """A fresh accountant (the default, PLD since issue 17 item 3; it was RDP) composed
    ``steps`` times with a full-batch (q = 1) DP-SGD step."""
    return PLDAccountant().compose(PoissonSampledEvent(1.0, GaussianEvent(SIGMA)), steps).get_epsilon(DELTA)


def _failing(client: Client, **kw) -> FailsAfterSteps:
    out = FailsAfterSteps(torch.utils.data.TensorDataset(client._x, client._y))
    for k, v in kw.items():
        setattr(out, k, v)
    return out


def test_a_first_fit_that_raises_after_k_steps_keeps_them_on_the_client():
    client = _failing(make_clients(4)[0], fail_at=3)
    dp = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA)
    model = tiny_model()
    params = torch.zeros(sum(p.numel() for p in model.parameters()))
    outcome = fit_one(client, params, {"model": model, "seed": 3, "local_dp": dp})
    assert isinstance(outcome.error, RuntimeError) and outcome.result is None
    want = _full_batch_eps(3)
    assert client.local_epsilon(DELTA) == pytest.approx(want, rel=1e-12)
    assert outcome.epsilon == pytest.approx(want, rel=1e-12)
    assert client._local_dp.fits == 0 and client._local_dp.noise_offset > 0  # 3 steps' noise used
    # without local DP nothing is reported; a client that never took a DP step reports None
    assert failed_client_epsilon(client, {"seed": 3}) is None
    assert failed_client_epsilon(make_clients(4)[1], {"local_dp": dp}) is None


def test_history_epsilon_counts_the_failed_clients_steps_sequential():
    clients = make_clients(4)  # 30 examples each, batch 8: 4 steps at q = 1/4 per fit
    clients[1] = _failing(clients[1], fail_at=2)
    dp = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA)
    h = run_simulation(tiny_model, clients, FedAvg(), rounds=1, clients_per_round=4, lr=0.2,
                       batch_size=8, local_dp=dp, progress=False, backend=SequentialBackend())
    want = _full_batch_eps(2)
    q, steps = local_dp_steps(30, 8, 1)
    healthy = PLDAccountant().compose(PoissonSampledEvent(q, GaussianEvent(SIGMA)), steps).get_epsilon(DELTA)
    assert healthy < want  # the failed client is the one that spent the most
    row = h.rounds[0]
    assert row["clients"] == [0, 2, 3]
    assert row["dropped"] == [{"cid": 1, "reason": "RuntimeError: device lost at step 3",
                               "epsilon": pytest.approx(want, rel=1e-12)}]
    assert h.epsilon == pytest.approx(want, rel=1e-12)


def test_a_nonfinite_result_counts_too_and_the_budget_sees_the_failed_steps():
    # max_epsilon between one full fit (4 steps) and 2 + 4 steps: after failing with 2 steps in
    # round 1 the client must refuse round 2 (it would have trained from a fresh state before)
    budget = (_full_batch_eps(4) + _full_batch_eps(6)) / 2
    dp = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA, max_epsilon=budget)
    clients = make_clients(2)
    clients[0] = _failing(clients[0], fail_at=2)
    h = run_simulation(tiny_model, clients, FedAvg(), rounds=2, clients_per_round=2, lr=0.2,
                       batch_size=8, local_dp=dp, progress=False)
    first, second = h.rounds
    assert first["dropped"][0]["cid"] == 0 and first["dropped"][0]["reason"].startswith("RuntimeError")
    assert second["dropped"] == [{"cid": 0, "reason": "budget", "epsilon": pytest.approx(_full_batch_eps(2))}]
    assert clients[0].local_epsilon(DELTA) == pytest.approx(_full_batch_eps(2), rel=1e-12)


def test_a_nonfinite_local_dp_result_still_counts_its_epsilon():
    class NaNAfterDP(FailsAfterSteps):
        failing_fits = 0

        def fit(self, parameters, config):
            res = super().fit(parameters, config)
            return type(res)(torch.full_like(res.update, float("nan")), res.num_examples, res.metrics)

    base = make_clients(2)
    clients = [NaNAfterDP(torch.utils.data.TensorDataset(base[0]._x, base[0]._y)), base[1]]
    dp = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA)
    h = run_simulation(tiny_model, clients, FedAvg(), rounds=1, clients_per_round=2, lr=0.2,
                       batch_size=8, local_dp=dp, progress=False)
    want = _full_batch_eps(4)
    assert h.rounds[0]["dropped"] == [{"cid": 0, "reason": "nonfinite", "epsilon": pytest.approx(want)}]
    assert h.epsilon == pytest.approx(want, rel=1e-12)


def test_state_after_lost_fit_is_the_whole_fit_unless_the_client_would_refuse():
    dp = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA)
    state = LocalDPState("pld")  # the default accountant (issue 17 item 3; it was "rdp")
    state.accountant.compose(PoissonSampledEvent(1.0, GaussianEvent(SIGMA)), 2)
    before = state.state_dict()
    lost = state_after_lost_fit(state, dp, 30, 30, 4)  # full batch, 4 epochs: 4 steps at q = 1
    assert lost.epsilon(DELTA) == pytest.approx(_full_batch_eps(6), rel=1e-12)
    assert state.state_dict() == before and lost.noise_offset == state.noise_offset
    assert state_after_lost_fit(None, dp, 30, 30, 4).epsilon(DELTA) == pytest.approx(_full_batch_eps(4))
    assert state_after_lost_fit(None, dp, 0, 8, 1).epsilon(DELTA) == 0.0  # no example: no step
    capped = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA, max_epsilon=_full_batch_eps(5))
    assert state_after_lost_fit(state, capped, 30, 30, 4) is state  # refused before training
    other = LocalDP(noise_multiplier=SIGMA, max_grad_norm=1.0, delta=DELTA, accountant="rdp")
    assert state_after_lost_fit(state, other, 30, 30, 4) is state  # refused: another accountant
    with pytest.raises(TypeError, match="local_dp"):
        state_after_lost_fit(state, {"noise_multiplier": 1.0}, 30, 30, 4)
