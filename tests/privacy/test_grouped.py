"""Grouped norms (per_sample/grouped.py, issue 16 item 2): the calls of one kind and shape computed
together must give the per-call path's clipped sums (grouping off) and the float64 per-record
reference (torch.func, clipped by hand), on the ghost and the materialise path, for every
clipping mode, with ``nonfinite="drop"``, and with a ghost-cancellation record inside a group
(its norm flagged by the rounding bound and materialised in float64, as on the per-call path).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import ppml_fast
from ppml_fast.privacy.per_sample import grouped
from ppml_fast.privacy.per_sample.linear import FLAGGED

C = 1.0


class Stack(nn.Module):
    """``depth`` Linear(d, d) layers (each followed by a LayerNorm when ``norm``), mean over the
    positions, a Linear head: the d x d layers (and the norms) form groups."""

    def __init__(self, d: int, depth: int = 3, norm: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth)) if norm else None
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
        return self.head(x.mean(1))


def _private(model, x, y, mode, **kw):
    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poisson_sampling=False and sigma = 0 warn by design
        pm, opt, _ = ppml_fast.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=C, grad_sample_mode=mode,
            poisson_sampling=False, **kw)
    return pm


def _sums(model, x, y, mode, grouping, monkeypatch, clipping="flat", nonfinite="raise"):
    """name -> clipped sum (float64) of one batch, with grouping on or off, and the number of
    calls that went through a group."""
    monkeypatch.setattr(grouped, "GROUPING", grouping)
    seen = []
    real = grouped.norms

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out)
        return out

    monkeypatch.setattr(grouped, "norms", spy)
    m = copy.deepcopy(model)
    names = {id(p): n for n, p in m.named_parameters()}
    pm = _private(m, x, y, mode)
    F.cross_entropy(pm(x), y).backward()
    norms = C if clipping != "per_layer" else [C] * len(names)
    sums, _ = pm.clipped_sums(max_grad_norm=norms, clipping=clipping, nonfinite=nonfinite)
    return {names[id(p)]: s.double() for p, s in sums.items()}, seen


def _reference(model, x, y, clipping="flat", gamma=0.01):
    """Float64 per-record gradients (torch.func), clipped and summed by the formulas."""
    m = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss(ps, xi, yi):
        return F.cross_entropy(functional_call(m, ps, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    if clipping == "per_layer":
        f = {n: (C / (t.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0) for n, t in g.items()}
        return {n: torch.einsum("b,b...->...", f[n], t) for n, t in g.items()}
    total = torch.cat([t.flatten(1) for t in g.values()], 1).norm(dim=1)
    f = C / (total + gamma) if clipping == "automatic" else (C / (total + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", f, t) for n, t in g.items()}


def _close(got: dict, want: dict, rtol: float, what: str) -> None:
    assert set(got) == set(want), what
    scale = max(float(t.abs().max()) for t in want.values())
    for n, t in want.items():
        err = float((got[n] - t).abs().max())
        assert err <= rtol * scale, f"{what}: {n} off by {err:.3e} (scale {scale:.3e})"


# (d, T): d x d layers at T = 4 take the ghost path, at T = 32 with d = 16 the materialise path
PATHS = {"ghost": (32, 4), "materialize": (16, 32)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("path", list(PATHS))
def test_grouped_equals_per_call_and_float64_reference(path, clipping, dtype, monkeypatch):
    d, T = PATHS[path]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Stack(d).to(dtype)
    x = torch.randn(6, T, d, generator=gen, dtype=dtype)
    x = x * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 30.0], dtype=dtype)[:, None, None]
    y = torch.randint(0, 3, (6,), generator=gen)
    got, seen = _sums(model, x, y, "ghost", True, monkeypatch, clipping)
    # ghost: the three d x d Linears and the three LayerNorms form two groups; materialise: the
    # LayerNorms only (materialise-path linears are not grouped)
    assert len(seen[0]) == (6 if path == "ghost" else 3)
    off, seen_off = _sums(model, x, y, "ghost", False, monkeypatch, clipping)
    assert seen_off == [{}]
    _close(got, off, 1e-12 if dtype == torch.float64 else 1e-6, "grouped vs per call")
    _close(got, _reference(model, x, y, clipping), 1e-10 if dtype == torch.float64 else 1e-5,
           "grouped vs float64 reference")


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_dropped_nonfinite_record_inside_a_group(mode, monkeypatch):
    d, T = PATHS["ghost"]
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = Stack(d)
    x = torch.randn(5, T, d, generator=gen)
    x[2, 1, 3] = float("inf")
    y = torch.randint(0, 3, (5,), generator=gen)
    got, seen = _sums(model, x, y, mode, True, monkeypatch, nonfinite="drop")
    assert len(seen[0]) == (6 if mode == "ghost" else 3)
    off, _ = _sums(model, x, y, mode, False, monkeypatch, nonfinite="drop")
    _close(got, off, 1e-6, "grouped vs per call")
    keep = torch.tensor([0, 1, 3, 4])
    _close(got, _reference(model, x[keep], y[keep]), 1e-5, "grouped vs float64 reference")


def test_cancellation_record_inside_a_group_is_flagged_and_clipped(monkeypatch):
    """Record 0's first-layer input holds (M, a) and (-M, a) at two positions with equal output
    gradients (no normalisation, mean pooling): its Gram terms cancel in every d x d layer, the
    bound flags it inside the group, and the float64 step equals the per-call and the materialised
    path and moves by at most C when the record is removed."""
    d, T, B = 32, 4, 6
    M, a = 2.0**50, 1000.0
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = Stack(d, norm=False).double()
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    x[0] = 0
    x[0, 0, 0], x[0, 3, 0] = M, -M
    x[0, 0, 1] = x[0, 3, 1] = a
    y = torch.randint(0, 3, (B,), generator=gen)
    got, seen = _sums(model, x, y, "ghost", True, monkeypatch)
    flagged = [i for i, (_, st) in seen[0].items() if FLAGGED in st]
    assert len(seen[0]) == 3 and flagged, "the record is flagged inside the group"
    # the engine's float64 materialised path (per call) as reference: a torch.func forward
    # rounds the record's +-M activations differently (~1e-4 of the step here)
    want, _ = _sums(model, x, y, "materialize", False, monkeypatch)
    _close(got, want, 1e-9, "grouped vs float64 materialised")
    off, _ = _sums(model, x, y, "ghost", False, monkeypatch)
    _close(got, off, 1e-12, "grouped vs per call")
    without, _ = _sums(model, x[1:], y[1:], "ghost", True, monkeypatch)
    moved = torch.cat([(got[n] - without[n]).flatten() for n in got]).norm()
    assert float(moved) <= C * (1 + 1e-9)


def test_groups_are_split_under_the_buffer_limit(monkeypatch):
    """A group whose buffers would pass MAX_GROUP_ELEMENTS is computed in chunks (here: the three
    d x d Linears as two and one, the last on its own), with the same sums."""
    d, T = PATHS["ghost"]
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = Stack(d)
    x = torch.randn(6, T, d, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    per_call = 2 * 6 * T * T + 6 * d  # Gram matrices and bias of one call
    monkeypatch.setattr(grouped, "MAX_GROUP_ELEMENTS", 2 * per_call)
    got, seen = _sums(model, x, y, "ghost", True, monkeypatch)
    linear = [i for i, (n, _) in seen[0].items() if n["weight"].shape == (6,) and "bias" in n
              and grouped.GROUP in seen[0][i][1] and seen[0][i][1][grouped.GROUP][0].ghost]
    assert len(linear) == 2, "two of the three Linears in one chunk, the third on its own"
    _close(got, _reference(model, x, y), 1e-5, "chunked groups vs float64 reference")
