"""The embedding rule's native per-record norms (per_sample/embedding_rows.py,
csrc/cpu/embedding_norms.cpp): upper bounds of the exact norms, tight, padding-aware, with the
flags of the torch paths for records whose terms cancel."""

import pytest
import torch

from ppml_fast import _C
from ppml_fast.privacy import per_sample as ps
from ppml_fast.privacy.per_sample import embedding_rows as ER
from ppml_fast.privacy.per_sample.embedding import FLAGGED, EmbeddingRule


def _exact(idx, g, num, pad=None):
    """float64 per-record squared norms of the dense (V, D) gradients."""
    B, T = idx.shape
    dense = torch.zeros(B, num, g.shape[-1], dtype=torch.float64)
    dense.index_put_((torch.arange(B)[:, None].expand(B, T), idx), g.double(), accumulate=True)
    if pad is not None:
        dense[:, pad] = 0
    return dense.pow(2).sum((1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,V,D,pad", [(4, 7, 5, 3, None), (16, 32, 1000, 64, None), (3, 40, 6, 17, 2),
                                         (1, 1, 1, 1, None), (5, 9, 3, 8, 0), (2, 0, 4, 3, None)])
def test_norms_bound_the_exact_norms(dtype, B, T, V, D, pad):
    g = torch.Generator().manual_seed(B * 100 + T)
    idx = torch.randint(0, V, (B, T), generator=g)
    grad = torch.randn(B, T, D, generator=g, dtype=dtype)
    sq, bound, s = ER.norms(idx, grad, pad)
    exact = _exact(idx, grad, V, pad)
    assert ((sq - exact).abs() <= bound).all()
    assert (bound <= 1e-12 * exact.clamp(min=1e-300) + 1e-300).all() or T == 0
    cap = ps.Captured("embedding", idx, {"weight": torch.nn.Parameter(torch.zeros(V, D, dtype=dtype))},
                      {"padding_idx": pad})
    norms, _ = EmbeddingRule().norms_sq(cap, grad)
    assert (norms["weight"].double() >= exact).all()
    torch.testing.assert_close(norms["weight"].double(), exact, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                               atol=1e-30)


def test_native_and_torch_rows_agree(monkeypatch):
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 50, (8, 64), generator=g)
    grad = torch.randn(8, 64, 16, generator=g)
    cap = ps.Captured("embedding", idx, {"weight": torch.nn.Parameter(torch.zeros(50, 16))}, {})
    out = []
    for on in (False, True):
        monkeypatch.setattr(ER, "ENABLED", on)
        out.append(EmbeddingRule().norms_sq(cap, grad)[0]["weight"])
    exact = _exact(idx, grad, 50)
    for n, rtol in zip(out, (1e-3, 1e-6)):  # the torch path's float32 row sums bound looser
        assert (n.double() >= exact).all()
        torch.testing.assert_close(n.double(), exact, rtol=rtol, atol=0)


def test_cancelling_record_is_flagged_and_clipped():
    """Record 0 looks up row 3 twice with +M and -M (+ a small part): its exact norm is small, the
    float32 book-keeping index_add would round its +-M terms (~u M f each): flagged, summed in
    float64 on its own, so its clipped contribution has norm <= C."""
    M = 2.0 ** 30
    B, T, V, D = 3, 4, 6, 2
    idx = torch.tensor([[3, 3, 1, 2], [0, 1, 2, 4], [5, 5, 5, 5]])
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    grad[0, 0] = torch.tensor([M, 1.0])
    grad[0, 1] = torch.tensor([-M, 2.0])
    w = torch.nn.Parameter(torch.zeros(V, D))
    cap = ps.Captured("embedding", idx, {"weight": w}, {})
    rule = EmbeddingRule()
    norms, state = rule.norms_sq(cap, grad)
    assert FLAGGED in state and 0 in state[FLAGGED][0].tolist()
    exact = _exact(idx, grad, V)
    assert (norms["weight"].double() >= exact).all()
    C = 1.0
    f = (C / norms["weight"].double().sqrt()).clamp(max=1.0).float()
    only0 = torch.tensor([1.0, 0.0, 0.0]) * f
    total = rule.clipped_sum(cap, grad, only0, state)["weight"]
    assert total.double().norm() <= C * (1 + 1e-5)


def test_padding_rows_do_not_count():
    idx = torch.tensor([[0, 0, 1], [2, 0, 0]])
    grad = torch.ones(2, 3, 4)
    sq, _, s = ER.norms(idx, grad, 0)
    torch.testing.assert_close(sq, torch.tensor([4.0, 4.0], dtype=torch.float64))
    assert s[0] > 0 and s[0] < 2.1 * 2.0  # one non-padding row of norm 2 (times the slack)


def test_usable_and_refusals(monkeypatch):
    i = torch.zeros(2, 3, dtype=torch.int64)
    assert ER.usable(i, torch.zeros(2, 3, 4))
    assert not ER.usable(i, torch.zeros(2, 3, 4, dtype=torch.float16))
    monkeypatch.setattr(ER, "ENABLED", False)
    assert not ER.usable(i, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="g2 must be"):
        ER.norms(i, torch.zeros(2, 4, 4), None)
    with pytest.raises(ValueError, match="float32 or float64"):
        _C.embedding_norms(2, 1, 1, 1, 1, 1, -1, 1, 1, 1)
    with pytest.raises(ValueError, match="must not be null"):
        _C.embedding_norms(0, 2, 2, 2, 0, 0, -1, 0, 0, 1)
    with pytest.raises(ValueError, match=">= 0"):
        _C.embedding_norms(0, -1, 2, 2, 0, 0, -1, 0, 0, 1)


def test_norms_refuses_what_the_kernel_cannot_read():
    i = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32/float64"):
        ER.norms(i, torch.zeros(2, 3, 4, dtype=torch.float16), None)
    with pytest.raises(ValueError, match="integer"):
        ER.norms(i.float(), torch.zeros(2, 3, 4), None)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_dp_step_same_with_and_without_native_norms(monkeypatch, padding_idx):
    """A whole DP step (noise 0, float64, records clipped: C small) of an embedding-bag-like model
    with repeated tokens gives the same clipped sums with the native norms as with the torch
    rows formulation (both bounds ~1e-15 relative in float64)."""
    import warnings

    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ppml_fast.privacy import PrivacyEngine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 5, padding_idx=padding_idx)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    x = torch.randint(0, 7, (6, 40), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for on in (False, True):
        monkeypatch.setattr(ER, "ENABLED", on)
        torch.manual_seed(0)
        model = Net().double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private, dp, _ = PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(y), batch_size=6), noise_multiplier=0.0,
                max_grad_norm=0.01, poisson_sampling=False)
        dp.zero_grad()
        torch.nn.functional.cross_entropy(private(x), y).backward()
        dp.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-15, msg=n)
