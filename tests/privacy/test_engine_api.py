"""Opacus's make_private surface (issue 17 item 2): criterion= returns four values, Opacus's
grad_sample_mode names, the criterion's reduction, and a failed make_private leaving the model
as it was."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast import PrivacyEngine
from ppml_fast.privacy import PrivateModule


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=8)


def test_criterion_gives_four_values_and_trains():
    model, opt, loader = _setup()
    crit = nn.CrossEntropyLoss(reduction="sum")
    out = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                       noise_multiplier=1.0, max_grad_norm=1.0, criterion=crit,
                                       grad_sample_mode="ghost")
    assert len(out) == 4
    private, dp_opt, criterion, dl = out
    assert criterion is crit and private.loss_reduction == "sum"  # the criterion's reduction
    for x, y in dl:
        dp_opt.zero_grad()
        criterion(private(x), y).backward()
        dp_opt.step()
    assert dp_opt.steps == len(dl)


def test_without_criterion_three_values():
    model, opt, loader = _setup()
    assert len(PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=1.0, max_grad_norm=1.0)) == 3


def test_a_loss_reduction_contradicting_the_criterion_is_refused_and_the_model_is_untouched():
    model, opt, loader = _setup()
    with pytest.raises(ValueError, match="contradicts the criterion"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                     max_grad_norm=1.0, criterion=nn.CrossEntropyLoss(), loss_reduction="sum")
    PrivateModule(model).remove_hooks()  # not wrapped: can be wrapped now


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost", "materialize"])
def test_opacus_grad_sample_modes_are_accepted(mode):
    model, opt, loader = _setup()
    private, dp_opt, dl = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                       noise_multiplier=0.0, max_grad_norm=1.0,
                                                       grad_sample_mode=mode, noise_seed=1)
    x, y = next(iter(DataLoader(loader.dataset, batch_size=8)))
    nn.functional.cross_entropy(private(x), y).backward()
    dp_opt.step()
    assert dp_opt.steps == 1


def test_a_failed_make_private_leaves_the_model_unwrapped():
    model, opt, loader = _setup()
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                     noise_multiplier=float("nan"), max_grad_norm=1.0)
    # the retry works (before: "already wrapped by a PrivateModule")
    private, _, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=1.0, max_grad_norm=1.0)
    assert isinstance(private, PrivateModule)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_accountant_history_in_opacus_format(accountant):
    model, opt, loader = _setup()
    engine = PrivacyEngine(accountant=accountant)
    private, dp_opt, dl = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                              noise_multiplier=1.3, max_grad_norm=1.0)
    for x, y in dl:
        dp_opt.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        dp_opt.step()
    # Opacus: [(noise_multiplier, sample_rate, num_steps)], len() = number of entries
    assert engine.accountant.history == [(1.3, 1 / len(loader), len(loader))]
    assert len(engine.accountant) == 1
    assert engine.accountant.events == [("gaussian", 1 / len(loader), 1.3, len(loader))]


def test_an_empty_accountant_is_still_truthy():
    """len() counts history entries (Opacus); an empty accountant must still be an object that
    exists for `if shadow:` checks (the budget stop's RDP shadow would skip its first event)."""
    from ppml_fast.accounting import PLDAccountant, RDPAccountant

    for acc in (RDPAccountant(), PLDAccountant()):
        assert len(acc) == 0 and bool(acc)
