"""The budget stop consults the accountant that reports epsilon (issue 15 item 7; DESIGN.md
invariant 5): events composed into ``engine.accountant`` from outside, a loaded history or a
replaced accountant are seen at the next step, also by the PLD fast paths (the RDP shadow and
the cached count of steps that fit), which must stay exact upper bounds of the same history.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.accounting import GaussianEvent, LaplaceEvent, PLDAccountant, PoissonSampledEvent
from ppml_fast.privacy import PrivacyBudgetExceeded, PrivacyEngine

MAX_EPS, DELTA = 3.0, 1e-5


def _setup(accountant, sigma=4.0):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    data = TensorDataset(torch.randn(64, 5), torch.zeros(64))
    engine = PrivacyEngine(accountant=accountant)
    m, o, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=16), noise_multiplier=sigma, max_grad_norm=1.0,
        noise_seed=1, max_epsilon=MAX_EPS, delta=DELTA)
    return engine, m, o, data.tensors[0][:16]


def _steps_until_refused(engine, m, o, x, limit=40):
    ran = 0
    for _ in range(limit):
        o.zero_grad()
        m(x).sum().backward()
        try:
            o.step()
        except PrivacyBudgetExceeded as e:
            assert e.epsilon > MAX_EPS
            return ran
        ran += 1
        assert engine.get_epsilon(DELTA) <= MAX_EPS, ran  # never a step past the budget
    return ran


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("outside", [GaussianEvent(0.5), GaussianEvent(1.6), LaplaceEvent(1.0)],
                         ids=["over", "near", "laplace"])
def test_an_event_composed_from_outside_is_seen(accountant, outside):
    engine, m, o, x = _setup(accountant)
    assert _steps_until_refused(engine, m, o, x, limit=2) == 2  # caches built on this history
    engine.accountant.compose(outside)  # as a mechanism's caller would
    _steps_until_refused(engine, m, o, x)
    assert engine.get_epsilon(DELTA) <= MAX_EPS or outside == GaussianEvent(0.5)
    if engine.get_epsilon(DELTA) > MAX_EPS:  # the outside event alone broke it: no step after
        assert sum(h[-1] for h in engine.accountant.events if h[0] == "gaussian" and h[1] < 1) == 2


def test_fits_cache_is_not_trusted_after_an_outside_event():
    # PLD allows more steps than RDP: the count of steps that fit is cached once; an outside
    # event must cut it
    engine, m, o, x = _setup("pld", sigma=2.0)
    ran = _steps_until_refused(engine, m, o, x, limit=3)
    assert o._budget._fits is not None or o._budget._shadow  # a fast path is in use
    engine.accountant.compose(GaussianEvent(2.0))
    ran += _steps_until_refused(engine, m, o, x, limit=400)
    fresh = PLDAccountant().compose(PoissonSampledEvent(0.25, GaussianEvent(2.0)), ran)
    fresh.compose(GaussianEvent(2.0))
    assert engine.get_epsilon(DELTA) == pytest.approx(fresh.get_epsilon(DELTA), rel=1e-9)
    assert engine.get_epsilon(DELTA) <= MAX_EPS


def test_a_loaded_or_replaced_history_is_seen():
    engine, m, o, x = _setup("pld")
    _steps_until_refused(engine, m, o, x, limit=2)
    big = PLDAccountant().compose(GaussianEvent(0.6))
    engine.accountant.load_state_dict(big.state_dict())
    assert _steps_until_refused(engine, m, o, x) == 0
    o.accountant = engine.accountant = PLDAccountant().compose(GaussianEvent(0.55))
    assert _steps_until_refused(engine, m, o, x) == 0
