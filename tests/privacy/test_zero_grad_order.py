"""``loss = crit(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()``: the
forward's batch survives ``zero_grad()`` (only batches whose gradients arrived are forgotten), so
this common loop order trains as ``zero_grad(); forward; backward; step`` does (Opacus supports
it). Before, the batch was forgotten and the step released noise alone (no gradient at all)."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine


def _private(noise=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(4)), batch_size=4),
            noise_multiplier=noise, max_grad_norm=0.5, poisson_sampling=False, noise_seed=3)
    return model, private, opt


X = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 0, 1])


def _grads(order: str, noise=0.0):
    model, private, opt = _private(noise)
    for _ in range(2):
        if order == "zero_grad first":
            opt.zero_grad()
            loss = nn.functional.cross_entropy(private(X), Y)
        else:
            loss = nn.functional.cross_entropy(private(X), Y)
            opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_zero_grad_between_forward_and_backward_trains_the_same(noise):
    g1, w1 = _grads("zero_grad first", noise)
    g2, w2 = _grads("zero_grad after the forward", noise)
    assert any(float(g.abs().sum()) > 0 for g in g1)
    for a, b in zip(g1 + w1, g2 + w2):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_zero_grad_still_forgets_backpropagated_batches():
    model, private, opt = _private()
    nn.functional.cross_entropy(private(X), Y).backward()
    opt.zero_grad()  # the backpropagated batch is forgotten: this step has no records
    opt.step()
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())


def test_kept_forward_and_a_new_forward_both_backpropagated_are_refused():
    """A forward kept across zero_grad and a second forward, both in one backward: two batches
    (they could be two sampled batches), refused as before."""
    model, private, opt = _private()
    loss_a = nn.functional.cross_entropy(private(X), Y)
    opt.zero_grad()
    loss_b = nn.functional.cross_entropy(private(X), Y)
    (loss_a + loss_b).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="forward|batch"):
        opt.step()
    for p, w in zip(model.parameters(), before):
        assert torch.equal(p, w)
