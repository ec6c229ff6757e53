"""EmbeddingRule against the torch.func float64 reference: repeated indices, padding_idx (also
negative), multi-dimensional index tensors; the three norm formulas agree; refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppml_fast.privacy.per_sample import Captured, make_rules

from ._reference import check_empty, check_rule, randn


def _fn(kwargs: dict):
    def fn(idx, ps):
        return F.embedding(idx, ps["weight"], **kwargs)

    return fn


@pytest.mark.parametrize(
    "idx_shape, kwargs",
    [
        ((4, 7), {}),
        ((4, 7), {"padding_idx": 2}),
        ((3, 2, 5), {"padding_idx": -1}),
        ((5, 1), {}),
    ],
)
@pytest.mark.parametrize("gram_max_seq", [0, 10**9], ids=["rows", "gram"])
def test_embedding_matches_reference(idx_shape, kwargs, gram_max_seq, monkeypatch):
    """"auto" both ways (sorted rows, T x T Gram), plus "ghost" and "materialize"."""
    from ppml_fast.privacy.per_sample import embedding

    monkeypatch.setattr(embedding, "GRAM_MAX_SEQ", gram_max_seq)
    gen = torch.Generator().manual_seed(21)
    num, dim = 6, 4  # few rows: many repeated indices within a sample
    idx = torch.randint(0, num, idx_shape, generator=gen)
    idx[0].view(-1)[:3] = num - 1  # a sample with repeats of the last row (padding_idx=-1)
    if "padding_idx" in kwargs:
        idx[1].view(-1)[:] = kwargs["padding_idx"] % num  # a sample made only of padding
    check_rule("embedding", _fn(kwargs), idx, {"weight": randn((num, dim), gen)}, kwargs,
               reduction=idx[0].numel() * dim)


@pytest.mark.parametrize("gram_max_seq", [0, 10**9], ids=["rows", "gram"])
def test_padding_row_gets_nothing(gram_max_seq, monkeypatch):
    from ppml_fast.privacy.per_sample import embedding

    monkeypatch.setattr(embedding, "GRAM_MAX_SEQ", gram_max_seq)
    gen = torch.Generator().manual_seed(22)
    idx = torch.tensor([[2, 2, 0], [1, 2, 2]])
    cap = Captured("embedding", idx, {"weight": randn((4, 3), gen)}, {"padding_idx": 2})
    g = randn((2, 3, 3), gen)
    rule = make_rules()["embedding"]
    for mode in ("auto", "ghost", "materialize"):
        norms, state = rule.norms_sq(cap, g, mode=mode)
        torch.testing.assert_close(norms["weight"], torch.stack([g[0, 2].pow(2).sum(), g[1, 0].pow(2).sum()]))
        sums = rule.clipped_sum(cap, g, torch.ones(2, dtype=torch.float64), state)
        assert not bool(sums["weight"][2].any())
    assert not bool(rule.per_sample(cap, g)["weight"][:, 2].any())


def test_norm_formulas_agree_at_transformer_shape():
    gen = torch.Generator().manual_seed(23)
    idx = torch.randint(0, 50, (8, 64), generator=gen)
    cap = Captured("embedding", idx, {"weight": randn((50, 16), gen)}, {"padding_idx": 0})
    g = randn((8, 64, 16), gen)
    rule = make_rules()["embedding"]
    auto, _ = rule.norms_sq(cap, g)
    ghost, _ = rule.norms_sq(cap, g, mode="ghost")
    mat, _ = rule.norms_sq(cap, g, mode="materialize")
    torch.testing.assert_close(auto["weight"], mat["weight"], rtol=1e-12, atol=0)
    torch.testing.assert_close(ghost["weight"], mat["weight"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("flag", ["scale_grad_by_freq", "sparse"])
def test_refused_options(flag):
    gen = torch.Generator().manual_seed(24)
    cap = Captured("embedding", torch.zeros(2, 3, dtype=torch.long), {"weight": randn((4, 3), gen)}, {flag: True})
    rule = make_rules()["embedding"]
    for call in (lambda: rule.norms_sq(cap, randn((2, 3, 3), gen)),
                 lambda: rule.per_sample(cap, randn((2, 3, 3), gen)),
                 lambda: rule.clipped_sum(cap, randn((2, 3, 3), gen), torch.ones(2), None)):
        with pytest.raises(ValueError, match=flag):
            call()


def test_float_indices_are_refused():
    gen = torch.Generator().manual_seed(25)
    cap = Captured("embedding", torch.zeros(2, 3), {"weight": randn((4, 3), gen)}, {})
    with pytest.raises(ValueError, match="indices"):
        make_rules()["embedding"].norms_sq(cap, randn((2, 3, 3), gen))


def test_empty_batch():
    gen = torch.Generator().manual_seed(26)
    check_empty("embedding", torch.zeros(0, 5, dtype=torch.long), {"weight": randn((4, 3), gen)},
                {"padding_idx": 1}, (0, 5, 3))
