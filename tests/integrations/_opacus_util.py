"""Shared by the tests that run Opacus's examples and tutorials: the parameters before a run,
the checks that a run trained (every trainable parameter moved and finite, finite losses, a
finite positive epsilon), and the numbers an example printed."""

from __future__ import annotations

import math

import torch
from torch import nn


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _assert_trained(before, model, engine, delta, losses) -> None:
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after)), "a parameter did not move"
    assert all(torch.isfinite(a).all() for a in after)
    assert losses and all(math.isfinite(v) for v in losses), losses
    eps = engine.get_epsilon(delta)
    assert 0 < eps < math.inf, eps


def _printed(capsys, key: str) -> list[float]:
    """The numbers printed after ``key`` (e.g. "Loss: ") by the examples' own print lines."""
    out = capsys.readouterr().out
    vals = []
    for part in out.split(key)[1:]:
        vals.append(float(part.split()[0].rstrip(",)")))
    return vals
