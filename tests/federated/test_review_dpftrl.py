"""Adversarial review of DPFTRLFedAvg (issue 19 item 2, helper A19): ways a caller could make
the reported user-level epsilon smaller than the loss of what was released."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppml_fast.accounting.errors import PrivacyError
from ppml_fast.federated import ClientProxy, DPFTRLFedAvg, FedAvg, FitResult

SIGMA, CLIP, P = 1.0, 0.5, 10


def _strategy(**kw):
    s = DPFTRLFedAvg(FedAvg(), noise_multiplier=SIGMA, clip_norm=CLIP, rounds=6,
                     mechanism="tree", min_separation=2, **kw)
    s.setup(num_available_clients=8, clients_per_round=2)
    return s


def _results(cids):
    return [(ClientProxy(c), FitResult(update=torch.ones(P), num_examples=1, metrics={})) for c in cids]


def _round(s, proxies, rng, params):
    picked = s.configure_fit(s.rounds + 1, params, proxies, 2, rng)
    return s.aggregate_fit(s.rounds + 1, params, _results([c.cid for c, _ in picked]), [])[0], picked


def test_clip_and_sigma_changed_at_the_same_std_are_refused():
    """Found by A19: only sigma x C was checked, so clip_norm halved with noise_multiplier
    doubled passed, and the tree's later rounds were accounted at the doubled sigma while their
    rows still hold earlier rounds' updates clipped at the old C (under-reported epsilon)."""
    s = _strategy()
    proxies, rng, params = [ClientProxy(i) for i in range(8)], np.random.default_rng(0), torch.zeros(P)
    params, _ = _round(s, proxies, rng, params)
    s.clip_norm, s.noise_multiplier = CLIP / 2, 2 * SIGMA
    eps, rounds = s.epsilon(1e-5), s.rounds
    with pytest.raises(PrivacyError, match="noise multiplier"):
        _round(s, proxies, rng, params)
    assert (s.rounds, s.epsilon(1e-5)) == (rounds, eps)


def test_results_of_clients_not_picked_this_round_are_refused():
    """Found by A19: aggregate_fit summed any results; a client picked one round earlier (a
    straggler) or a client returning twice was then in rounds closer than min_separation, or
    twice in one round, which the accountant never counted."""
    s = _strategy()
    proxies, rng, params = [ClientProxy(i) for i in range(8)], np.random.default_rng(0), torch.zeros(P)
    params, picked = _round(s, proxies, rng, params)
    before = [c.cid for c, _ in picked]
    now = s.configure_fit(s.rounds + 1, params, proxies, 2, rng)
    cids = [c.cid for c, _ in now]
    eps, rounds, offset = s.epsilon(1e-5), s.rounds, s.offset
    for bad in (cids + before[:1], cids + cids[:1]):  # a straggler of the last round; twice
        with pytest.raises(PrivacyError, match="picked by configure_fit"):
            s.aggregate_fit(s.rounds + 1, params, _results(bad), [])
        assert (s.rounds, s.epsilon(1e-5), s.offset) == (rounds, eps, offset)
    s.aggregate_fit(s.rounds + 1, params, _results(cids[:1]), [])  # a dropout: fine
    assert s.rounds == rounds + 1
