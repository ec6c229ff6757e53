"""Position embeddings: indices no record repeats (HF's (1, T) position_ids broadcast over the
batch as a stride-0 expand, or explicit (B, T) ids) take the distinct-rows path of the embedding
rule ("auto"): squared norm = float64 sum of the rows' squares, never below the float64 reference;
the clipped sum equals the reference; a record that repeats an index takes the bounded paths; and
through PrivateModule the broadcast ids give each record its own gradient (no per-record loop)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppml_fast.privacy.per_sample import Captured, embedding, make_rules

from ._reference import assert_close, check_rule, randn, reference


def _fn(kwargs):
    def fn(idx, ps):
        return F.embedding(idx, ps["weight"], **kwargs)

    return fn


@pytest.mark.parametrize("kwargs", [{}, {"padding_idx": 0}], ids=["plain", "padding"])
@pytest.mark.parametrize("shared", [True, False], ids=["broadcast", "explicit"])
def test_distinct_rows_match_reference(shared, kwargs):
    B, T, V, D = 5, 40, 48, 6  # T >= GRAM_MAX_SEQ: without the distinct path "auto" sorts rows
    ids = torch.arange(T)
    idx = ids[None].expand(B, T) if shared else torch.stack(
        [torch.randperm(V, generator=torch.Generator().manual_seed(i))[:T] for i in range(B)])
    cap = Captured("embedding", idx, {"weight": torch.zeros(V, D)}, kwargs)
    assert embedding.distinct(cap, idx.reshape(B, T).long(), kwargs.get("padding_idx"))
    check_rule("embedding", _fn(kwargs), idx, {"weight": randn((V, D), torch.Generator().manual_seed(1))},
               kwargs, reduction=T * D)


def test_norm_is_an_upper_bound_in_float32():
    B, T, V, D = 6, 16, 16, 8
    idx = torch.arange(T)[None].expand(B, T)
    g = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    cap = Captured("embedding", idx, {"weight": torch.zeros(V, D)}, {})
    norms, state = make_rules()["embedding"].norms_sq(cap, g)
    want = g.double().square().sum((1, 2))
    assert bool((norms["weight"].double() >= want).all())
    assert bool((norms["weight"].double() <= want * (1 + 2.0**-22)).all())
    assert bool((state[embedding.BOUND] >= 0).all())


def test_repeated_index_is_not_distinct():
    idx = torch.tensor([[0, 1, 2], [3, 3, 1]])
    cap = Captured("embedding", idx, {"weight": torch.zeros(4, 2)}, {})
    assert not embedding.distinct(cap, idx, None)
    assert embedding.distinct(cap, idx, 3)  # the repeats are padding: they contribute nothing
    shared = torch.tensor([[0, 1, 1]]).expand(2, 3)
    assert not embedding.distinct(Captured("embedding", shared, {}, {}), shared, None)


class _PosModel(nn.Module):
    def __init__(self, T=20, D=4, K=3):
        super().__init__()
        self.tok, self.pos = nn.Embedding(30, D), nn.Embedding(T, D)
        self.head = nn.Linear(D, K)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])[None]  # (1, T): broadcast over the records
        return self.head(torch.tanh(self.tok(ids) + self.pos(pos)).mean(1))


def test_broadcast_position_ids_per_record_gradients_through_private_module():
    """The engine expands (1, T) ids to (B, T) (stride 0) and the rule sees each record's own
    output gradients: clipped sum = float64 per-record reference."""
    from ppml_fast.privacy import PrivateModule

    torch.manual_seed(0)
    model = _PosModel().double()
    ref_model = _PosModel().double()
    ref_model.load_state_dict(model.state_dict())
    ids = torch.randint(0, 30, (6, 20), generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(4))
    private = PrivateModule(model, loss_reduction="sum")
    seen = []
    rule = private.rules["embedding"]
    norms_sq = rule.norms_sq

    def spy(cap, grad, **kw):
        seen.append(cap.activation.stride(0) == 0)
        return norms_sq(cap, grad, **kw)

    rule.norms_sq = spy
    F.cross_entropy(private(ids), y, reduction="sum").backward()
    sums, _ = private.clipped_sums(max_grad_norm=0.5)
    assert True in seen  # the position call arrived broadcast
    params = dict(ref_model.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(6):
        ref_model.zero_grad()
        F.cross_entropy(ref_model(ids[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        gi = {n: p.grad.clone() for n, p in params.items()}
        norm = torch.sqrt(sum(g.square().sum() for g in gi.values()))
        f = min(1.0, 0.5 / (float(norm) + 1e-6))
        for n in want:
            want[n] += f * gi[n]
    for n, p in model.named_parameters():
        assert_close(sums[p], want[n], 1e-10, n)
    _ = reference  # the rule-level reference is used by check_rule above
