"""Tied input/output embeddings (per_sample/tied.py): the squared norm of ``E_i + H_i`` (embedding
and linear uses of one weight) against the float64 reference ``||E_i + H_i||^2`` (never the sum of
the two norms), on the fold path (the linear rule kept its per-sample gradients) and the ghost
path (cross term and its rounding bound), with padding, repeated indices and one-position linear
inputs; a record whose two parts cancel (``E_i ~ -H_i``); which sharing patterns are paired."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ppml_fast.privacy.per_sample import Captured, make_rules, tied

from ._reference import float32_rtol

V, D = 9, 5


def _reference(idx, delta, x, g, pad=None) -> torch.Tensor:
    """(B, V, D) float64 per-record gradients of the shared weight, by definition."""
    B = idx.shape[0]
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    out = torch.einsum("btv,btd->bvd", g.double(), x.double())
    for i in range(B):
        for t in range(idx.shape[1]):
            if pad is None or int(idx[i, t]) != pad:
                out[i, int(idx[i, t])] += delta[i, t].double()
    return out


def _case(seed, B=5, T_e=6, T_l=4, two_d=False, pad=None):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T_e), generator=gen)
    idx[0, :3] = 2  # repeats
    if pad is not None:
        idx[1, ::2] = pad
    delta = torch.randn(B, T_e, D, generator=gen, dtype=torch.float64)
    shape = (B, D) if two_d else (B, T_l, D)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape[:-1] + (V,), generator=gen, dtype=torch.float64)
    # record 2: its head gradient points against its embedding gradient (negative cross term)
    x2 = x[2] if two_d else x[2, 0]
    g2 = g[2] if two_d else g[2, 0]
    x2.copy_(-delta[2, 0])
    g2.zero_()
    g2[int(idx[2, 0])] = 1.0
    return idx, delta, x, g


def _caps(idx, delta, x, g, dtype, pad=None):
    w = torch.zeros(V, D, dtype=dtype)
    emb = Captured("embedding", idx, {"weight": w}, {"padding_idx": pad})
    lin = Captured("linear", x.to(dtype), {"weight": w}, {})
    return emb, delta.to(dtype), lin, g.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["ghost", "auto", "materialize"])
@pytest.mark.parametrize("shape", ["seq", "two_d", "pad", "long"])
def test_tied_norms_and_sums_match_reference(shape, mode, dtype):
    pad = 4 if shape == "pad" else None
    kw = {"two_d": shape == "two_d", "pad": pad}
    if shape == "long":  # T_e >= GRAM_MAX_SEQ: the embedding's sort-and-add rows path
        kw.update(T_e=40, T_l=3)
    idx, delta, x, g = _case(1, **kw)
    emb, de, lin, gl = _caps(idx, delta, x, g, dtype, pad)
    rules = make_rules(mode)
    norms, st_e, st_l = tied.norms(emb, de, lin, gl, rules)
    ref = _reference(idx, de, lin.activation, gl, pad)
    want = ref.flatten(1).square().sum(1)
    rtol = 1e-10 if dtype == torch.float64 else float32_rtol(64)
    got = norms["weight"].double()
    assert bool((got >= want * (1 - rtol)).all()), (got, want)
    assert bool((got <= want * (1 + max(rtol, 1e-5))).all()), (got, want)
    parts = (_reference(idx, de, lin.activation, 0 * gl, pad).flatten(1).square().sum(1)
             + _reference(idx, 0 * de, lin.activation, gl, pad).flatten(1).square().sum(1))
    assert not torch.allclose(parts, want, rtol=1e-3)  # the cross term matters here
    f = torch.rand(idx.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    s_e = rules["embedding"].clipped_sum(emb, de, f.to(dtype), st_e)["weight"]
    s_l = rules["linear"].clipped_sum(lin, gl, f.to(dtype), st_l)["weight"]
    want_sum = torch.einsum("b,bvd->vd", f.to(dtype).double(), ref)
    err = (s_e.double() + s_l.double() - want_sum).abs().max()
    assert err <= rtol * want_sum.abs().max() * 4, err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_parts_that_cancel_are_materialised(dtype, mode):
    """Record 0: E_0 = e_v (M r + a)^T, H_0 = e_v (-M r + b)^T: each part ~M, the sum ~|a + b|.
    Its norm must be >= the float64 norm of the sum and its clipped contribution <= C; the clipped
    sum equals the float64 reference."""
    M = 2.0**30
    idx, delta, x, g = _case(3, T_e=1, T_l=1)
    r = torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    a = torch.tensor([0.0, 0.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    b = torch.tensor([0.0, 0.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    v = int(idx[0, 0])
    delta[0, 0] = M * r + a
    x[0, 0] = -M * r + b
    g[0, 0] = 0
    g[0, 0, v] = 1.0
    emb, de, lin, gl = _caps(idx, delta, x, g, dtype)
    rules = make_rules(mode)
    norms, st_e, st_l = tied.norms(emb, de, lin, gl, rules)
    assert 0 in st_l["weight:flagged"][0].tolist()  # the crafted record (2 cancels exactly too)
    ref = _reference(idx, de, lin.activation, gl)
    want = ref.flatten(1).square().sum(1)
    assert float(want[0]) == pytest.approx(float((a + b).square().sum()))
    assert bool((norms["weight"].double() >= want * (1 - 1e-12)).all())
    assert float(norms["weight"][0]) == pytest.approx(float(want[0]), rel=1e-6)
    C = 1.0
    f = (C / (norms["weight"].double().sqrt() + 1e-6)).clamp(max=1.0)
    fd = f.to(dtype)

    def total(factors):
        s_e = rules["embedding"].clipped_sum(emb, de, factors, st_e)["weight"]
        s_l = rules["linear"].clipped_sum(lin, gl, factors, st_l)["weight"]
        return s_e.double() + s_l.double()

    full = total(fd)
    want_sum = torch.einsum("b,bvd->vd", fd.double(), ref)
    assert (full - want_sum).norm() <= 1e-4 * C * idx.shape[0]
    f0 = fd.clone()
    f0[0] = 0
    assert (full - total(f0)).norm() <= C * (1 + 1e-4)


def _call(op, params, grad=True, spans=None):
    return SimpleNamespace(cap=Captured(op, torch.zeros(1), params, {}), params=params,
                           grad=torch.zeros(1) if grad else None, spans=spans)


def test_pairs_only_one_embedding_and_one_linear():
    w = torch.nn.Parameter(torch.zeros(V, D))
    bias = torch.nn.Parameter(torch.zeros(V))
    rules = make_rules()
    emb, lin = _call("embedding", {"weight": w}), _call("linear", {"weight": w, "bias": bias})
    assert tied.pairs([lin, emb], {id(w)}, rules) == {id(w): (1, 0)}
    assert tied.pairs([emb, lin, _call("linear", {"weight": w})], {id(w)}, rules) == {}
    assert tied.pairs([emb, _call("linear_t", {"weight": w})], {id(w)}, rules) == {}
    assert tied.pairs([emb, _call("linear", {"weight": w}, spans={"weight": (0, 5)})], {id(w)}, rules) == {}
    assert tied.pairs([emb, lin], {id(w), id(bias)}, rules) == {}  # the bias shared elsewhere
    assert tied.pairs([emb, _call("linear", {"weight": w}, grad=False)], {id(w)}, rules) == {}


class _TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.head = torch.nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("mode", ["ghost", "auto"])
def test_dropped_record_keeps_the_pair_joint(mode):
    """nonfinite="drop": a record with a non-finite gradient is dropped, and the pair's states
    are recomputed jointly (tied.drop_states): the sum equals the float64 per-record reference of
    the other records, also for the record whose parts cancel."""
    from ppml_fast.privacy import PrivateModule
    from ppml_fast.privacy.per_sample import make_rules as mk

    torch.manual_seed(0)
    model = _TiedLM().double()
    ref = _TiedLM().double()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (5, 4), generator=torch.Generator().manual_seed(1))
    weights = torch.ones(5, 4, V, dtype=torch.float64)
    weights[3] = float("inf")  # record 3: an infinite gradient

    def loss_of(net, rows):
        return (net(ids[rows]) * weights[rows]).sum()

    private = PrivateModule(model, loss_reduction="sum")
    private.rules = mk(mode)
    seen = []
    drop_states = tied.drop_states
    tied.drop_states = lambda *a: seen.append(1) or drop_states(*a)
    try:
        loss_of(private, slice(None)).backward()
        sums, _ = private.clipped_sums(max_grad_norm=1.0, nonfinite="drop")
    finally:
        tied.drop_states = drop_states
    assert seen
    want = torch.zeros(V, D, dtype=torch.float64)
    for i in (0, 1, 2, 4):
        ref.zero_grad()
        loss_of(ref, slice(i, i + 1)).backward()
        g = ref.emb.weight.grad
        want += min(1.0, 1.0 / (float(g.norm()) + 1e-6)) * g
    got = sums[model.emb.weight]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got - want).abs().max()
