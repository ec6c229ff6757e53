"""Review of the issue-16 rules by an attacker (helper A16), part 2: tied input/output embeddings
and grouped per-sample norms (part 1, ``test_review_issue16``: recurrent layers and transformers'
``Conv1D``). Tied weights used three ways, looked up twice, read by F.linear outside their
modules, broadcast position ids with padding, crafted records whose embedding and head parts
cancel (across the pair, or inside the embedding part); equal-shape Linear / LayerNorm calls in
groups with frozen parts, shared weights and repeated calls; max_norm set after make_private.
Same assertions as the rest of the suite (``_harness``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ppml_fast.privacy import PrivacyError
from tests.privacy.sensitivity._harness import Case, check_case, scaled
from tests.privacy.sensitivity.test_review_issue16 import (B, CONV, D, K, MODES, REC, T, V, _gen,
                                                           _ids, _private, _seeded, _y)

# -- tied embeddings ------------------------------------------------------------------------------
class TiedThrice(nn.Module):
    """One (V, D) weight: the input embedding and two heads (one per position, one on the mean)."""

    def __init__(self, pad=None):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=pad)
        self.h1, self.h2 = nn.Linear(D, V, bias=False), nn.Linear(D, V)
        self.h1.weight = self.h2.weight = self.emb.weight
        self.out = nn.Linear(2 * V, K)

    def forward(self, ids):
        e = torch.tanh(self.emb(ids))
        return self.out(torch.cat([self.h1(e).mean(1), self.h2(e.mean(1))], -1))


class TiedTwiceEmbedding(nn.Module):
    """The embedding looked up twice (two index tensors of the record) and one tied head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.out = nn.Linear(V, K)

    def forward(self, ids):
        e = self.emb(ids) + self.emb(ids.flip(1))
        return self.out(self.head(torch.tanh(e)).mean(1))


class TiedFunctional(nn.Module):
    """Embedding and head tied, the weight also read by F.linear in the parent's forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.out = nn.Linear(V, K)

    def forward(self, ids):
        e = torch.tanh(self.emb(ids))
        return self.out(self.head(e).mean(1) + F.linear(e, self.emb.weight).sum(1))


class TiedPositions(nn.Module):
    """A position embedding looked up with broadcast (1, T) ids, tied to a head over positions,
    with padding_idx on the token embedding: every record repeats the same position rows."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, T, bias=False)
        self.head.weight = self.pos.weight
        self.tokhead = nn.Linear(D, V, bias=False)
        self.tokhead.weight = self.tok.weight
        self.out = nn.Linear(T + V, K)

    def forward(self, ids):
        h = torch.tanh(self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None]))
        return self.out(torch.cat([self.head(h).mean(1), self.tokhead(h).mean(1)], -1))


class TiedCancel(nn.Module):
    """Tied embedding/head where the head reads the looked-up row itself, negated and scaled:
    with a crafted record the embedding and head parts of the record's gradient nearly cancel."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        e = self.emb(ids)  # (B, T, D)
        return self.head(-e).mean(1)[:, :K]


def _tied_cases():
    ids, y = _ids(), _y()
    pad = ids.clone()
    pad[1, :2] = 0
    rep = ids.clone()
    rep[2] = 5  # one token repeated over the record
    return {
        "tied_thrice": dict(build=_seeded(TiedThrice), inputs=(rep,), target=y, adversarial=(2,)),
        "tied_thrice_padding": dict(build=_seeded(TiedThrice, 0), inputs=(pad,), target=y,
                                    adversarial=(1,)),
        "tied_twice_embedding": dict(build=_seeded(TiedTwiceEmbedding), inputs=(rep,), target=y,
                                     adversarial=(2,)),
        "tied_functional": dict(build=_seeded(TiedFunctional), inputs=(ids,), target=y,
                                refuse_ok=True),
        "tied_positions": dict(build=_seeded(TiedPositions), inputs=(pad,), target=y,
                               adversarial=(1,)),
        "tied_cancel": dict(build=_seeded(TiedCancel), inputs=(rep,), target=y, adversarial=(2,)),
    }


TIED = _tied_cases()


@pytest.mark.parametrize("mode,rules", MODES)
@pytest.mark.parametrize("name", sorted(TIED))
def test_tied_attacks(name, mode, rules):
    check_case(Case(name=f"{name}[{mode},{rules}]", mode=mode, rules=rules, **TIED[name]),
               replace=True)


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
@pytest.mark.parametrize("name", sorted(TIED))
def test_tied_attacks_clipping(name, clipping):
    check_case(Case(name=f"{name}[{clipping}]", clipping=clipping, **TIED[name]), replace=True)


class TiedCrossCancel(nn.Module):
    """Embedding and tied head whose two parts of a record's gradient cancel by construction:
    out_0 = <emb(idx), v> + sum_s head(u_s)[idx], so (times the loss's factor) E = e_idx v^T and
    H = e_idx (sum_s u_s)^T; a record with sum_s u_s = -v + a has G = e_idx a^T while ||E|| and
    ||H|| are ||v|| = 2^30 |r| (the ghost path's cross term cancels M^2: its rounding bound must
    flag the record)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, u, v):
        e = self.emb(ids[:, :1])[:, 0]  # (B, D)
        logits = self.head(u)  # (B, D) or (B, S, D) -> (..., V)
        picked = logits.gather(-1, ids[:, :1].expand(*logits.shape[:-1], 1).contiguous()
                               if logits.dim() == 2 else
                               ids[:, None, :1].expand(*logits.shape[:-1], 1))[..., 0]
        picked = picked if picked.dim() == 1 else picked.sum(1)
        s = (e * v).sum(-1) + picked
        return torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)], -1)


def _cross_cancel_case(seq: bool, dtype):
    from tests.privacy.sensitivity._harness import (CANCEL_A, CANCEL_KAPPA, CANCEL_M,
                                                    cancellation_pair)

    g = _gen(11)
    ids = torch.randint(0, V, (B, 1), generator=g)
    u = torch.randn(B, 2, D, generator=g, dtype=torch.float64) if seq else \
        torch.randn(B, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, D, generator=g, dtype=torch.float64)
    x1, x2 = cancellation_pair(D, CANCEL_M, CANCEL_A)  # x1 = M r + a, x2 = -M r + a
    v[2] = (x1 - x2) / 2  # M r
    if seq:
        u[2, 0], u[2, 1] = -(x1 - x2) / 2, (x1 + x2) / 2  # -M r, a: sum = -v + a
    else:
        u[2] = x2  # -M r + a
    return Case(name=f"tied_cross_cancel[{'seq' if seq else 'one'},{dtype}]",
                build=_seeded(TiedCrossCancel), inputs=(ids, u, v),
                target=torch.zeros(B, dtype=torch.long),
                dtype=dtype, kappa=CANCEL_KAPPA, adversarial=(2,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("mode,rules", MODES)
def test_tied_cross_term_cancellation(seq, dtype, mode, rules):
    check_case(_cross_cancel_case(seq, dtype).with_(mode=mode, rules=rules), replace=True)


# -- grouped norms --------------------------------------------------------------------------------
GD = 16  # wide enough for the ghost path at T = 2 (grouped linear calls)


class EqualShapes(nn.Module):
    """Linear(GD, GD) calls of one shape on (B, 2, GD) sequences, in pairs of equal roles (each
    pair one group): plain, weight frozen (bias-only calls), bias frozen; then two sharing one
    weight and one called twice (shared: materialised, outside the groups), and a LayerNorm pair
    of one shape."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.b1, self.b2, self.c1, self.c2 = (nn.Linear(GD, GD) for _ in range(6))
        self.d, self.e, self.f = (nn.Linear(GD, GD) for _ in range(3))
        for m in (self.b1, self.b2):
            m.weight.requires_grad_(False)
        for m in (self.c1, self.c2):
            m.bias.requires_grad_(False)
        self.e.weight = self.d.weight
        self.n1, self.n2 = nn.LayerNorm(GD), nn.LayerNorm(GD)
        self.head = nn.Linear(GD, K)

    def forward(self, x):
        h = sum(torch.tanh(m(x)) for m in (self.a1, self.b1, self.c1))
        h = h + sum(torch.tanh(m(x.flip(1) * 0.5)) for m in (self.a2, self.b2, self.c2))
        h = self.n1(h + torch.tanh(self.d(h)) + torch.tanh(self.e(x)))
        h = self.n2(torch.tanh(self.f(h)) + torch.tanh(self.f(x.flip(1))))
        return self.head(h.mean(1))


def _grouped_case(**kw):
    x = torch.randn(B, 2, GD, generator=_gen(5), dtype=torch.float64)
    from tests.privacy.sensitivity._harness import CANCEL_KAPPA, with_cancellation

    x = with_cancellation(x, 3)
    x = scaled(x, 1, 1e3)
    return Case(name="grouped_equal_shapes", build=_seeded(EqualShapes), inputs=(x,), target=_y(),
                adversarial=(1, 3), kappa=CANCEL_KAPPA, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("mode,rules", MODES)
def test_grouped_equal_shapes(mode, rules, clipping, dtype):
    n = sum(p.requires_grad for p in EqualShapes().parameters())
    C = [0.1 + 0.05 * i for i in range(n)] if clipping == "per_layer" else 1.0
    check_case(_grouped_case(mode=mode, rules=rules, clipping=clipping, dtype=dtype, C=C),
               replace=True)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids))).mean(1)[:, :K]


# review A16: refused at the call, before the lookup (layers._embedding_forward)
def test_max_norm_set_after_make_private_leaves_weight_unchanged():
    torch.manual_seed(0)
    model = TiedLM().double()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)  # rows above max_norm
    private, dp = _private(model)
    model.emb.max_norm = 0.5
    before = model.emb.weight.detach().clone()
    with pytest.raises(PrivacyError):
        dp.zero_grad()
        F.cross_entropy(private(_ids()), _y()).backward()
        dp.step()
    assert torch.equal(model.emb.weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,rules", MODES)
@pytest.mark.parametrize("name", ["tied_thrice_padding", "tied_positions", "tied_cancel",
                                  "conv1d_group", "conv1d_tied_embedding", "lstm_twice",
                                  "gru_tied_inside"])
def test_low_precision(name, mode, rules, dtype):
    cases = {**TIED, **CONV, **REC}
    check_case(Case(name=f"{name}[{mode},{rules},{dtype}]", mode=mode, rules=rules, dtype=dtype,
                    **cases[name]), replace=True)


class BroadcastIds(nn.Module):
    """Embeddings looked up with (1, T) ids broadcast over the records that repeat an index
    (position ids [0, 1, 1, 2], e.g. a shared prefix), and with per-record ids of which only one
    record repeats a token: the distinct-rows path must not be taken for either."""

    def __init__(self):
        super().__init__()
        self.pos, self.tok = nn.Embedding(T, D), nn.Embedding(V, D)
        self.head = nn.Linear(D, K)

    def forward(self, ids):
        shared = torch.tensor([[0, 1, 1, 2]])
        return self.head(torch.tanh(self.pos(shared) + self.tok(ids)).mean(1))


@pytest.mark.parametrize("mode,rules", MODES)
def test_embedding_repeats_in_broadcast_and_one_record(mode, rules):
    ids = torch.stack([torch.randperm(V, generator=_gen(i))[:T] for i in range(B)])  # distinct
    ids[3] = 7  # one record repeats one token T times
    check_case(Case(name=f"broadcast_repeats[{mode},{rules}]", build=_seeded(BroadcastIds),
                    inputs=(ids,), target=_y(), mode=mode, rules=rules, adversarial=(3,)),
               replace=True)


class TiedEmbeddingCancel(nn.Module):
    """Tied pair whose embedding part cancels inside itself: out_0 = sum_t <emb(idx_t), v_t> +
    head(u)[idx_0]; a record repeating one token with v_0 = M r, v_1 = -M r + a has E = e_idx
    a^T from two rows of size M (the embedding rule's Gram cancels: its flag must reach the
    pair's joint recomputation)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, u, v):
        s = (self.emb(ids) * v).sum((1, 2)) + self.head(u).gather(-1, ids[:, :1])[:, 0]
        return torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)], -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,rules", MODES)
def test_tied_embedding_internal_cancellation(mode, rules, dtype):
    from tests.privacy.sensitivity._harness import (CANCEL_A, CANCEL_KAPPA, CANCEL_M,
                                                    cancellation_pair)

    g = _gen(12)
    ids = torch.randint(0, V, (B, 2), generator=g)
    u = torch.randn(B, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, 2, D, generator=g, dtype=torch.float64)
    x1, x2 = cancellation_pair(D, CANCEL_M, CANCEL_A)
    ids[2] = ids[2, 0]
    v[2, 0], v[2, 1] = (x1 - x2) / 2, x2  # M r and -M r + a: sum a
    check_case(Case(name=f"tied_embedding_cancel[{mode},{rules},{dtype}]",
                    build=_seeded(TiedEmbeddingCancel), inputs=(ids, u, v),
                    target=torch.zeros(B, dtype=torch.long), dtype=dtype, kappa=CANCEL_KAPPA,
                    mode=mode, rules=rules, adversarial=(2,)), replace=True)
