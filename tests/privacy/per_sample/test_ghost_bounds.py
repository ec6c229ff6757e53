"""Ghost-norm cancellation (issue 14, item 2), rule level: records crafted so that the Gram terms
of their ghost norm cancel (x_1 = (M, a), x_2 = (-M, a) with equal output gradients; for an
embedding g_s = (M, v), g_t = (-M, v) on one index) must get a norm >= the float64 reference
(materialised from the same rounded inputs) and a clipped sum equal to the float64 reference,
for sequence Linear, an nn.MultiheadAttention in-projection, Conv1d/Conv2d and Embedding, in
float32, bfloat16, float16 and float64. Before the bounds, these norms came out ~0 and one
record moved the clipped sum by ~1e3 C.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppml_fast.privacy.per_sample import Captured, bounds, make_rules
from ppml_fast.privacy.per_sample.linear import FLAGGED

from ._reference import UPPER_SLACK, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
C = 1.0


def _big(dtype: torch.dtype) -> float:
    """M: a power of two (exact in every dtype), 2^14 where float16 overflows at 65504."""
    return 2.0**14 if dtype == torch.float16 else 2.0**30


def _rtol(dtype: torch.dtype) -> float:
    """Tolerance of the clipped sum against the float64 reference, relative to C per record:
    rounding of float32 arithmetic (16-bit inputs are computed in float32) over the short sums
    here, and honest records' norms over-estimated by at most their (tiny) bound."""
    return 1e-10 if dtype == torch.float64 else 1e-4


def _linear_case(dtype, gen, B=6, T=4, d=8, p=5):
    M = _big(dtype)
    x = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    # positions 0 and T-1: not adjacent, so that no matmul adds +M and -M to each other first
    x[0, T - 1] = x[0, 0]
    x[0, 0, 0], x[0, T - 1, 0] = M, -M
    g[0, T - 1] = g[0, 0]
    params = {"weight": torch.randn(p, d, generator=gen, dtype=torch.float64),
              "bias": torch.randn(p, generator=gen, dtype=torch.float64)}
    return "linear", lambda xx, ps: F.linear(xx, ps["weight"], ps["bias"]), x, g, params, {}


def _mha_case(dtype, gen, B=5, T=3, E=8):
    """The packed in-projection of a self-attention nn.MultiheadAttention (what the engine
    captures as one linear call, attention.py), with its own initialised parameters."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, 2, batch_first=True).double()
    M = _big(dtype)
    x = torch.randn(B, T, E, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, 3 * E, generator=gen, dtype=torch.float64)
    x[1, 2] = x[1, 0]
    x[1, 0, 3], x[1, 2, 3] = M, -M
    g[1, 2] = g[1, 0]
    params = {"weight": mha.in_proj_weight.detach().clone(), "bias": mha.in_proj_bias.detach().clone()}
    return "linear", lambda xx, ps: F.linear(xx, ps["weight"], ps["bias"]), x, g, params, {}


def _conv1d_case(dtype, gen, B=4, Cin=3, L=6, Cout=4):
    M = _big(dtype)
    x = torch.randn(B, Cin, L, generator=gen, dtype=torch.float64)
    x[0, :, L - 1] = x[0, :, 0]
    x[0, 0, 0], x[0, 0, L - 1] = M, -M
    g = torch.randn(B, Cout, L, generator=gen, dtype=torch.float64)
    g[0, :, L - 1] = g[0, :, 0]
    params = {"weight": torch.randn(Cout, Cin, 1, generator=gen, dtype=torch.float64),
              "bias": torch.randn(Cout, generator=gen, dtype=torch.float64)}
    return "conv1d", lambda xx, ps: F.conv1d(xx, ps["weight"], ps["bias"]), x, g, params, {}


def _conv2d_case(dtype, gen, B=4, Cin=2, Cout=3):
    """2x2 kernel, stride 2 on 2x6 images: three patches; the record's first and last are
    (M, a) and (-M, a)."""
    M = _big(dtype)
    x = torch.randn(B, Cin, 2, 6, generator=gen, dtype=torch.float64)
    x[0, :, :, 4:6] = x[0, :, :, 0:2]
    x[0, 0, 0, 0], x[0, 0, 0, 4] = M, -M
    g = torch.randn(B, Cout, 1, 3, generator=gen, dtype=torch.float64)
    g[0, :, 0, 2] = g[0, :, 0, 0]
    params = {"weight": torch.randn(Cout, Cin, 2, 2, generator=gen, dtype=torch.float64),
              "bias": torch.randn(Cout, generator=gen, dtype=torch.float64)}
    kwargs = {"stride": 2}
    return "conv2d", lambda xx, ps: F.conv2d(xx, ps["weight"], ps["bias"], stride=2), x, g, params, kwargs


def _embedding_case(dtype, gen, B=4, T=5, V=11, D=6):
    M = _big(dtype)
    idx = torch.randint(0, V, (B, T), generator=gen)
    idx[0, 0] = idx[0, 3] = 7
    g = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g[0, 3] = g[0, 0]
    g[0, 0, 0], g[0, 3, 0] = M, -M
    params = {"weight": torch.randn(V, D, generator=gen, dtype=torch.float64)}
    return "embedding", lambda ii, ps: F.embedding(ii, ps["weight"]), idx, g, params, {}


def _embedding_long_case(dtype, gen):
    """T = 40 >= GRAM_MAX_SEQ: "auto" takes the sort-and-add rows path."""
    return _embedding_case(dtype, gen, B=3, T=40, V=50, D=4)


CASES = {"linear": _linear_case, "mha_in_proj": _mha_case, "conv1d": _conv1d_case,
         "conv2d": _conv2d_case, "embedding": _embedding_case, "embedding_rows": _embedding_long_case}


def _setup(name, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    op, fn, x, g, params, kwargs = CASES[name](dtype, gen)
    xd = x.to(dtype) if x.is_floating_point() else x
    gd = g.to(dtype)
    pd = {r: t.to(dtype) for r, t in params.items()}
    # The float64 reference of exactly these (rounded) inputs.
    ref = reference(fn, xd, {r: t.double() for r, t in pd.items()}, gd.double())
    cap = Captured(op=op, activation=xd, params=pd, kwargs=kwargs)
    return cap, gd, ref


def _factors(total_sq: torch.Tensor) -> torch.Tensor:
    return (C / (total_sq.double().sqrt() + 1e-6)).clamp(max=1.0)


def _ref_sum(ref: dict, factors: torch.Tensor, drop: int | None = None) -> dict:
    f = factors.clone()
    if drop is not None:
        f[drop] = 0
    return {r: torch.einsum("b,b...->...", f, g) for r, g in ref.items()}


def _materialised_error(cap: Captured, gd: torch.Tensor, f: torch.Tensor) -> float:
    """Bound of the float64 rounding of the clipped, materialised gradients (Higham (3.5):
    ||G' - G|| <= gamma_T S_i per record, S_i = sum_t ||x_t|| ||g_t||), summed over records with
    their factors: the accuracy any float64 materialisation has, also the reference's own."""
    g = gd.double().flatten(2) if cap.op.startswith("conv") else gd.double()
    if cap.op == "embedding":
        s = torch.linalg.vector_norm(g, dim=-1).sum(1)
        seq = g.shape[1]
    elif cap.op == "linear":
        x = cap.activation.double()
        s = (torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(g, dim=-1)).sum(1)
        seq = x.shape[1]
    else:  # a convolution: bound each position's column by the whole input's norm
        x = cap.activation.double().flatten(1)
        s = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(g, dim=1).sum(-1)
        seq = g.shape[-1] * 8
    return float((2 * seq * 2.0**-53 * s * f.double()).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["ghost", "auto"])
@pytest.mark.parametrize("name", list(CASES))
def test_cancellation_record_is_clipped(name, mode, dtype):
    cap, gd, ref = _setup(name, dtype)
    rule = make_rules(mode)[cap.op]
    norms, state = rule.norms_sq(cap, gd)
    total = sum(n.double() for n in norms.values())
    f = _factors(total)
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    got = rule.clipped_sum(cap, gd, f.to(fdt), state)
    # Sensitivity of the adversarial record (record 0, record 1 for the attention case): its
    # removal moves the rule's clipped sum by at most C (within rounding), on every path.
    adv = 1 if name == "mha_in_proj" else 0
    f_drop = f.clone()
    f_drop[adv] = 0
    got_drop = rule.clipped_sum(cap, gd, f_drop.to(fdt), state)
    delta = torch.cat([(got[r].double() - got_drop[r].double()).flatten() for r in ref]).norm().item()
    assert delta <= C * (1 + _rtol(dtype)), f"{name} {dtype} {mode}: one record moved the sum by {delta / C:.3e} C"
    if isinstance(state, dict) and "weight" in state:
        # "auto" materialised the whole call (its cost model): the norms are those of the
        # gradients it sums, computed in the input's precision; only the sensitivity applies.
        return
    ref_norms = {r: g.flatten(1).square().sum(1) for r, g in ref.items()}
    for r in ref:
        # Weight (ghost): upper bounds, >= the float64 norm of the exact gradient (the flagged
        # records' norms are of their float64 materialised gradient, equal to it up to float64
        # rounding). Bias: the norm of the materialised sum over positions it adds, in the
        # working precision (relative rounding only: a sum of squares of what is summed).
        rel = 2.0**-30 if (r == "weight" or dtype == torch.float64) else 2.0**-18
        lo = ref_norms[r] * (1 - rel) - 1e-30
        assert bool((norms[r].double() >= lo).all()), (
            f"{name} {dtype} {mode} norms[{r}] {norms[r].tolist()} below the reference "
            f"{ref_norms[r].tolist()}")
    f_ref = _factors(sum(ref_norms.values()))
    want = _ref_sum(ref, f_ref)
    tol = _rtol(dtype) * C * gd.shape[0] + _materialised_error(cap, gd, f_ref)
    for r in ref:
        err = (got[r].double() - want[r]).norm().item()
        assert err <= tol, f"{name} {dtype} {mode} clipped_sum[{r}]: error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["linear", "conv1d", "conv2d", "embedding", "embedding_rows"])
def test_per_layer_roles_and_book_keeping_exclusion(name, dtype):
    """Per-layer clipping calls clipped_sum once per role with the same state: the roles' sums
    equal the whole call's. And the flagged record must stay out of the book-keeping call: with
    a correct factor but the record inside (state None: book-keeping of everything), the
    rounding of its cancelling +-M terms alone moves float32 sums by far more than C."""
    cap, gd, ref = _setup(name, dtype)
    rule = make_rules("ghost")[cap.op]
    norms, state = rule.norms_sq(cap, gd)
    assert isinstance(state, dict) and FLAGGED in state and 0 in state[FLAGGED][0].tolist()
    f = _factors(sum(n.double() for n in norms.values()))
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    whole = rule.clipped_sum(cap, gd, f.to(fdt), state)
    for r in cap.params:
        sub = Captured(cap.op, cap.activation, {r: cap.params[r]}, cap.kwargs)
        part = rule.clipped_sum(sub, gd, f.to(fdt), state)
        assert set(part) == {r} and torch.equal(part[r], whole[r]), f"{name}: role {r} differs"
    want = _ref_sum(ref, f)
    inside = rule.clipped_sum(cap, gd, f.to(fdt), None)
    err_in = max((inside[r].double() - want[r]).norm().item() for r in ref)
    err_out = max((whole[r].double() - want[r]).norm().item() for r in ref)
    assert err_out <= _rtol(dtype) * C * gd.shape[0] + _materialised_error(cap, gd, f)
    if dtype == torch.float32 and name in ("linear", "conv1d", "conv2d"):
        # Documents the hazard (the amount depends on the matmul's summation order: an order
        # that adds +M and -M to each other first loses nothing; this CPU BLAS does not).
        assert err_in > 1e-2 * C, f"{name}: book-keeping with the record inside was off by only {err_in:.2e}"


@pytest.mark.parametrize("op, shape", [("linear", (16, 32, 64, 64)), ("linear", (8, 128, 96, 48)),
                                       ("conv2d", (8, 16, 8, 8))])
def test_honest_records_are_not_flagged_and_over_estimate_is_small(op, shape):
    """Random (honest) data: no record flagged, norms over by far less than TAU."""
    gen = torch.Generator().manual_seed(3)
    if op == "linear":
        B, T, d, p = shape
        x = torch.randn(B, T, d, generator=gen)
        g = torch.randn(B, T, p, generator=gen)
        w = torch.zeros(p, d)
        cap = Captured("linear", x, {"weight": w})
        exact = torch.einsum("btp,btd->bpd", g.double(), x.double()).flatten(1).square().sum(1)
    else:
        B, Cin, H, W = shape
        x = torch.randn(B, Cin, H, W, generator=gen)
        g = torch.randn(B, 16, H, W, generator=gen)
        w = torch.zeros(16, Cin, 3, 3)
        cap = Captured("conv2d", x, {"weight": w}, {"padding": 1})
        exact = reference(lambda xx, ps: F.conv2d(xx, ps["weight"], padding=1), x.double(),
                          {"weight": w.double()}, g.double())["weight"].flatten(1).square().sum(1)
    norms, state = make_rules("ghost")[op].norms_sq(cap, g)
    assert not (isinstance(state, dict) and FLAGGED in state)
    rel = norms["weight"].double() / exact - 1
    assert bool((rel >= -1e-6).all()) and float(rel.max()) <= UPPER_SLACK, float(rel.max())


def test_full_precision_context_restores_settings():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with bounds.full_precision():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_bound_constants():
    assert bounds.gamma(10, 2.0**-24) >= 10 * 2.0**-24
    assert bounds.gamma(2**24, 2.0**-24) == float("inf")
    v = torch.tensor([1.0 + 2.0**-30], dtype=torch.float64)
    assert float(bounds.round_up(v, torch.float32)) >= float(v)


@pytest.mark.parametrize("book_tau, flagged", [(bounds.BOOK_TAU, True), (float("inf"), False)])
def test_book_keeping_criterion_in_the_float64_gram_regime(book_tau, flagged, monkeypatch):
    """Long sequences of wide layers form float64 Gram matrices (bounds.gram_dtype), whose tiny
    bound no longer limits S/N: a moderate cancellation (M = 2^16) passes the Gram bound, and only
    BOOK_TAU keeps its terms out of the float32 book-keeping matmul (measured: 8e-4 C off without,
    5e-7 C with)."""
    monkeypatch.setattr(bounds, "BOOK_TAU", book_tau)
    gen = torch.Generator().manual_seed(0)
    B, T, d, p, M = 6, 64, 512, 512, 2.0**16
    assert bounds.gram_dtype(torch.float32, T, (d, p)) == torch.float64
    x, g = torch.randn(B, T, d, generator=gen), torch.randn(B, T, p, generator=gen)
    x[2] = 0
    x[2, 0, 0], x[2, T - 1, 0] = M, -M
    x[2, 0, 1] = x[2, T - 1, 1] = 1.0
    g[2, T - 1] = g[2, 0]
    cap = Captured("linear", x, {"weight": torch.zeros(p, d)})
    rule = make_rules("ghost")["linear"]
    norms, state = rule.norms_sq(cap, g)
    assert (isinstance(state, dict) and FLAGGED in state) == flagged
    G = torch.einsum("btp,btd->bpd", g.double(), x.double())
    ref = G.flatten(1).square().sum(1)
    assert bool((norms["weight"].double() >= ref * (1 - 2.0**-30)).all())
    f = (C / ref.sqrt()).clamp(max=1.0)
    err = (rule.clipped_sum(cap, g, f.float(), state)["weight"].double()
           - torch.einsum("b,bpd->pd", f, G)).norm().item()
    if flagged:
        assert err <= 1e-5 * C, err
    else:  # documents the hazard the criterion removes (order-dependent amount)
        assert err > 1e-5 * C, err
