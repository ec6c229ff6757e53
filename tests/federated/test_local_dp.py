"""Local DP-SGD inside a client: the client's own accountant composes over its fits, the budget
refusal changes nothing, the training is DP-SGD with the documented q, steps and denominators,
and the same seed gives the same update."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import ppml_fast
from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, RDPAccountant
from ppml_fast.federated import Client, LocalDP, ParameterLayout
from ppml_fast.federated.dp.local import local_dp_steps


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _w0():
    m = _model()
    return ParameterLayout.of(m).flatten(m)


def _cfg(local_dp, **kw):
    return {"model": _model(), "seed": 5, "lr": 0.2, "batch_size": 10, "local_epochs": 2,
            "local_dp": local_dp, **kw}


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_after_r_fits_is_the_accountants_for_r_times_the_steps(accountant):
    dp = LocalDP(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5, accountant=accountant)
    client = Client(_data(40))
    q, steps = local_dp_steps(40, 10, 2)
    assert (q, steps) == (0.25, 8)
    ref = RDPAccountant if accountant == "rdp" else PLDAccountant
    for r in range(1, 4):
        res = client.fit(_w0(), _cfg(dp, seed=r))
        want = ref().compose(PoissonSampledEvent(q, GaussianEvent(1.1)), r * steps).get_epsilon(1e-5)
        assert res.metrics["epsilon"] == pytest.approx(want, rel=1e-9)
        assert "loss" not in res.metrics  # computed without noise: not released under local DP
        assert res.num_examples == 40


def test_budget_refusal_raises_before_any_change():
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    event = PoissonSampledEvent(0.25, GaussianEvent(1.0))
    # the default accountant, PLD (issue 17 item 3; it was RDP)
    e2, e3 = (PLDAccountant().compose(event, k * 8).get_epsilon(1e-5) for k in (2, 3))
    dp = dataclasses.replace(dp, max_epsilon=(e2 + e3) / 2)  # two fits fit, the third does not
    client = Client(_data(40))
    client.fit(_w0(), _cfg(dp, seed=1))
    client.fit(_w0(), _cfg(dp, seed=2))
    before = client._local_dp.state_dict()
    x_before = client._x.clone()
    model = _model()
    with pytest.raises(ppml_fast.PrivacyBudgetExceeded, match="max_epsilon") as info:
        client.fit(_w0(), {**_cfg(dp, seed=3), "model": model})
    assert info.value.epsilon == pytest.approx(e3) and info.value.epsilon_budget == dp.max_epsilon
    assert client._local_dp.state_dict() == before and torch.equal(client._x, x_before)
    # nothing trained and no hook left on the scratch model
    assert torch.equal(ParameterLayout.of(model).flatten(model), _w0())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # a first fit that would already exceed the budget leaves a new client without state
    fresh = Client(_data(40))
    with pytest.raises(ppml_fast.PrivacyBudgetExceeded):
        fresh.fit(_w0(), _cfg(dataclasses.replace(dp, max_epsilon=0.01)))
    assert fresh._local_dp is None


def test_full_batch_with_negligible_noise_equals_local_gradient_descent():
    """q = 1 (batch_size >= n) and noise / clipping out of the way: DP-SGD's mean of clipped
    per-sample gradients is the plain full-batch gradient, with FedProx's term as in Client."""
    ds = _data(12)
    for mu in (0.0, 0.5):
        cfg = {"model": _model(), "seed": 3, "lr": 0.5, "batch_size": 12, "local_epochs": 3,
               "proximal_mu": mu}
        plain = Client(ds).fit(_w0(), cfg).update
        dp = Client(ds).fit(_w0(), {**cfg, "local_dp": LocalDP(1e-9, 1e3, 1e-5)}).update
        torch.testing.assert_close(dp, plain, rtol=0, atol=1e-6)


def test_clipping_bounds_the_step_and_the_noise_std_is_sigma_c_over_nq():
    """One full-batch step (q = 1): the mean of clipped per-sample gradients has norm <= C, and
    a noisy run minus a noiseless one is the noise alone, std lr * sigma * C / n a coordinate."""
    ds = _data(20)
    c, lr, sigma = 1e-3, 1.0, 2.0
    cfg = _cfg(None, lr=lr, batch_size=20, local_epochs=1)
    clean = Client(ds).fit(_w0(), {**cfg, "local_dp": LocalDP(1e-9, c, 1e-5)}).update
    assert float(clean.norm()) <= lr * c * (1 + 1e-4)
    noisy = Client(ds).fit(_w0(), {**cfg, "local_dp": LocalDP(sigma, c, 1e-5)}).update
    noise = (noisy - clean).double()
    # ||noise||^2 / (std^2) is chi-square with P degrees of freedom: relative sd sqrt(2 / P)
    p = noise.numel()
    ratio = float(noise.pow(2).sum()) / (p * (lr * sigma * c / 20) ** 2)
    assert abs(ratio - 1) < 4 * (2 / p) ** 0.5


def test_same_seed_same_update_and_offsets_move_across_fits():
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=0.5, delta=1e-5, noise_seed=9)
    a, b = Client(_data(40)), Client(_data(40))
    ra, rb = a.fit(_w0(), _cfg(dp)), b.fit(_w0(), _cfg(dp))
    assert torch.equal(ra.update, rb.update)
    # the same seed again on the same client: its noise continues, it does not repeat
    ra2 = a.fit(_w0(), _cfg(dp))
    assert not torch.equal(ra.update, ra2.update)
    assert a._local_dp.noise_offset > 0 and a._local_dp.fits == 2


def test_a_scratch_model_is_unhooked_after_a_dp_fit():
    model = _model()
    Client(_data(30)).fit(_w0(), {**_cfg(LocalDP(1.0, 1.0, 1e-5)), "model": model})
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())
    plain_cfg = {"seed": 1, "lr": 0.1, "batch_size": 8}
    a = Client(_data(30)).fit(_w0(), {**plain_cfg, "model": model}).update
    b = Client(_data(30)).fit(_w0(), {**plain_cfg, "model": _model()}).update
    assert torch.equal(a, b)


def test_empty_poisson_batches_are_fine():
    # 3 examples, batch 1: q = 1/3, P(empty batch) = 8/27
    res = Client(_data(3)).fit(_w0(), _cfg(LocalDP(1.0, 1.0, 1e-5), batch_size=1, local_epochs=5))
    assert torch.isfinite(res.update).all()


def test_switching_accountant_is_refused():
    client = Client(_data(20))
    client.fit(_w0(), _cfg(LocalDP(1.0, 1.0, 1e-5)))  # the default, "pld" (issue 17 item 3)
    with pytest.raises(ValueError, match="accountant"):
        client.fit(_w0(), _cfg(LocalDP(1.0, 1.0, 1e-5, accountant="rdp")))


@pytest.mark.parametrize("kwargs,name", [
    ({"noise_multiplier": 0.0}, "noise_multiplier"), ({"noise_multiplier": "1"}, "noise_multiplier"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"max_grad_norm": float("inf")}, "max_grad_norm"),
    ({"delta": 0.0}, "delta"), ({"delta": 1.0}, "delta"), ({"delta": None}, "delta"),
    ({"max_epsilon": 0.0}, "max_epsilon"), ({"accountant": "moments"}, "accountant"),
    ({"secure_mode": "yes"}, "secure_mode"),
])
def test_bad_local_dp_names_the_argument(kwargs, name):
    args = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        LocalDP(**args)


def test_local_dp_is_frozen_and_a_wrong_config_value_is_refused():
    dp = LocalDP(1.0, 1.0, 1e-5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dp.noise_multiplier = 0.1
    client = Client(_data(10))
    with pytest.raises(TypeError, match="local_dp"):
        client.fit(_w0(), _cfg({"noise_multiplier": 1.0}))
    assert client._local_dp is None
