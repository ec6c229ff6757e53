"""Rigorous floating-point error bounds for ghost (Gram-matrix) norms, and which records they
cannot vouch for (privacy invariant 2, "bounded norms": a clip factor only comes from a norm whose
rounding error is bounded).

Why. A ghost norm ``N^2 = sum_{s,t} (x_s.x_t)(g_s.g_t)`` is a sum of T^2 signed terms; a record
crafted so that they cancel (``x_1 = (M, a)``, ``x_2 = (-M, a)``, equal output gradients) has a true
norm ``~a`` while every term is ``~M^2``: the computed norm is rounding noise (~0 in float32 *and*
float64), the record escapes clipping and one step moved by 1.4e3 C (issue 14, item 2).

The bound (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Lemma 3.1 and eq.
(3.5): ``|fl(x.y) - x.y| <= gamma_n |x|.|y|``, ``gamma_n = n u / (1 - n u)``, for any summation
order, FMA included). With ``A_st = ||x_s|| ||x_t||``, ``B_st = ||g_s|| ||g_t||`` (Cauchy-Schwarz:
``|x_s|.|x_t| <= A_st``), Gram entries computed with dot lengths d and p, each Gram row's T
products ``a'_st b'_st`` summed in the working precision ``u_w`` (one ``vecdot``, no (B, T, T)
temporary: Higham (3.5) again, ``gamma_T(u_w)`` on ``sum |a' b'|``) and the T row sums added in
float64 (``u_64 = 2^-53``, ``n = T`` terms; ``groups * L`` for a convolution)::

    |a'b' - ab| <= (gamma_d + gamma_p + gamma_d gamma_p) A B
    |fl(sum_t a'b') - sum_t a'b'| <= gamma_T(u_w) (1 + gamma_d)(1 + gamma_p) sum_t A B
    |fl64(sum r') - sum r'| <= gamma_n(u_64) sum |r'|
    => |N'^2 - N^2| <= coef * sum_{s,t} A_st B_st = coef * S^2,   S = sum_t ||x_t|| ||g_t||,

    coef = gamma_d + gamma_p + gamma_d gamma_p
           + (gamma_T(u_w) + gamma_n(u_64)(1 + gamma_T(u_w)))(1 + gamma_d)(1 + gamma_p).

(:func:`gram_coef`). ``S`` is computed from float norms: each ``||v||`` comes from a sum of squares
(relative error ``gamma_len`` on the square) and a square root, so the true ``S`` is at most the
computed one times :func:`norm_slack`. Every Python-float constant here is rounded upward by a
factor ``1 + 2^-50`` (:func:`_up`), far above float64's own rounding of those few operations.

Unit roundoff ``u`` is that of the dtype the Gram matmuls really ran in: float64 ``2^-53``, float32
``2^-24`` (16-bit inputs are converted to float32 first: exact, then float32 arithmetic). TF32 /
bf16 matmul modes (``torch.set_float32_matmul_precision('high' | 'medium')``, the backends'
``fp32_precision``) round the *inputs* to 10 or 7 mantissa bits, which the formula above does not
cover: the Gram matmuls run inside :func:`full_precision`, which switches float32 matmuls to
IEEE precision for their duration (a no-op in the default 'highest' setting). The book-keeping
calls run there too (with cuDNN's TF32 convolutions off): see :func:`book_roundoff`.

What the rules do with the bound: the norm they return is ``N'^2 + bound`` (an upper bound of the
true squared norm of the record's exact gradient, which is what book-keeping sums), and a record
whose bound exceeds ``TAU * N'^2`` is *flagged*: its per-sample gradient is materialised (only
those records), its norm taken from that gradient (float64 sum of squares), and the clipped sum
adds ``f_i G_i`` for it separately while its factor in the book-keeping matmul is exactly 0. The
latter matters as much as the norm: with ``M = 2^30`` the book-keeping matmul's own rounding of the
cancelling ``+-M`` terms (``~u M``) moves the sum by ~32 C even with a correct norm.

``TAU = 1e-2``. For an unflagged record ``bound <= TAU N'^2`` and ``N'^2 <= N^2 + bound``, so
``N'^2 <= N^2 / (1 - TAU)`` and the returned ``N_up <= sqrt((1 + TAU)/(1 - TAU)) N ~ (1 + 0.01) N``:
a clipped honest record is scaled by at least ``0.99x`` its exact factor (as if C were at most 1%
smaller; only clipped records, i.e. those with ``N > C``, are affected at all). Unflagged records
also have ``S / N' <= sqrt(TAU / coef)`` (~13 for float32 at d + p = 1000), which keeps the
book-keeping matmul's rounding of their terms at the usual float32 level, ``~u * 13 * C``, not
``u M``.

Measured (dev CPU, float32, one thread; issue 14 report). Honest records flagged: 0 of 32-192
per case on random data (the five shapes of linear.py's table, also with mean-1 inputs), a
random-init tiny HF BERT (all q/k/v/dense Linears, T = 32 and 128) and an nn.TransformerEncoder
(d = 256, ff = 1024, T = 64); over-estimate of N^2 there: at most 1.4e-3 with float32 Gram
matrices (~(gamma_d + gamma_p + gamma_T) T, as predicted), ~1e-7 with float64 ones. Cost of the
bound, ghost norms_sq + clipped_sum against the rules without it: +4-24% at the table's float32
shapes, +30-37% where the Gram matrices go float64 (B=8 T=128 d=p=1024; B=4 T=128 d=768
p=3072), +4% at the MNIST conv2 shape, 0.22 -> 0.37 ms for an embedding at B=32 T=16 D=128.
Adversarial records: see tests/privacy/per_sample/test_ghost_bounds.py and
tests/privacy/test_ghost_cancellation.py (436-554 C before, 1.000 C after).

Not covered here (no cancellation, a relative error only): the T = 1 linear norm
``||g||^2 ||x||^2`` and norms of materialised gradients (linear/conv "materialize" paths, biases,
normalisation layers) are sums of squares of exactly what is summed, with relative error at most
``gamma_n`` (e.g. 6e-4 for a 10^4-element gradient in float32, realistically far less); they are
returned as computed.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

# Flag a record when its ghost-norm error bound exceeds TAU times its computed squared norm.
TAU = 1e-2

U64 = 2.0**-53
U32 = 2.0**-24


def _up(v: float) -> float:
    """``v`` rounded upward with margin (covers float64 rounding of the few operations here)."""
    return v * (1.0 + 2.0**-50)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the arithmetic a rule runs in: 2^-53 for float64, else 2^-24 (16-bit inputs are
    converted to float32 before any arithmetic)."""
    return U64 if dtype == torch.float64 else U32


def gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)`` (inf when ``n u >= 1``: no bound)."""
    return _gamma(max(int(n), 0), float(u))


# The constants below are pure functions of a layer's shape: cached, so that the DP step does
# not recompute them in Python for every layer and step (~180 gamma calls a step on a tiny BERT).
@functools.lru_cache(maxsize=4096)
def _gamma(n: int, u: float) -> float:
    nu = n * u
    return math.inf if nu >= 1.0 else _up(nu / (1.0 - nu))


@functools.lru_cache(maxsize=4096)
def gram_coef(d: int, p: int, inner: int, outer: int, u: float) -> float:
    """``coef`` of the module docstring: |N'^2 - N^2| <= coef * S^2 for a ghost norm from Gram
    matrices with dot lengths ``d`` and ``p`` (p = 0: one Gram matrix, the embedding's, whose
    other factor is an exact 0/1 mask), their entrywise products summed ``inner`` at a time in
    precision ``u`` (a row's ``vecdot``: the products' rounding included in ``gamma_inner``) and
    those ``outer`` partial sums added in float64."""
    gd, gp = gamma(d, u), (gamma(p, u) if p > 0 else 0.0)
    gi, go = gamma(max(inner, 1), u), gamma(outer, U64)
    return _up(gd + gp + gd * gp + (gi + go * (1.0 + gi)) * (1.0 + gd) * (1.0 + gp))


def norm_slack(lengths: tuple[int, ...], u: float, terms: int = 1) -> float:
    """Factor by which a true ``S = sum_t prod_k ||v_k,t||`` can exceed the computed one, when
    each ``||v_k,t||`` (length ``lengths[k]``) came from ``vector_norm`` in precision ``u`` (sum of
    squares: relative error ``gamma_len`` on the square; square root: ``u``) and the ``terms``
    products were formed and summed in float64."""
    return _norm_slack(tuple(int(n) for n in lengths), float(u), int(terms))


@functools.lru_cache(maxsize=4096)
def _norm_slack(lengths: tuple[int, ...], u: float, terms: int) -> float:
    low = 1.0
    for n in lengths:
        low *= math.sqrt(max(1.0 - gamma(n + 1, u), 0.0)) * (1.0 - u)
    low *= 1.0 - gamma(terms + len(lengths), U64)
    return math.inf if low <= 0.0 else _up(1.0 / low)


def row_norms(v: Tensor) -> Tensor:
    """Float64 L2 norms over the last dimension of ``v`` (computed in ``v``'s dtype, then
    widened: the rounding is what :func:`norm_slack` accounts for)."""
    return torch.linalg.vector_norm(v, dim=-1).double()


def diag_norms(gram: Tensor) -> Tensor:
    """Float64 ``||v_t||`` from the diagonal of a Gram matrix ``(..., T, T)``: each diagonal
    entry is a dot product of ``v_t`` with itself, a sum of squares with the same error as
    ``vector_norm``'s (relative ``gamma_len``, :func:`norm_slack`), at no extra pass over the
    inputs. Negative entries cannot occur (squares) and are clamped for safety."""
    return gram.diagonal(dim1=-2, dim2=-1).double().clamp(min=0.0).sqrt()


def upper_and_flags(
    computed: Tensor, bound: Tensor, out_dtype: torch.dtype, tau: float = TAU,
    s: Tensor | None = None, u_book: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(``computed + bound`` rounded upward to ``out_dtype``, flags): ``computed`` (float64) is
    each record's computed squared norm, ``bound`` (float64) its error bound. A record is flagged
    when ``bound > tau * computed`` or either is not finite (NaN compares false: such a record
    goes to the stable path, which reports it non-finite if it really is), and, given its
    ``s = sum_t ||x_t|| ||g_t||`` and the book-keeping's unit roundoff ``u_book``, when
    ``u_book * s > BOOK_TAU * sqrt(computed)`` (see :data:`BOOK_TAU`)."""
    flags = ~(bound <= tau * computed.clamp(min=0.0))
    if s is not None and u_book > 0.0:
        flags |= ~(s * u_book <= BOOK_TAU * computed.clamp(min=0.0).sqrt())
    up = (computed.clamp(min=0.0) + bound) * (1.0 + 2.0**-50)
    return round_up(up, out_dtype), flags


# The book-keeping matmul (or convolution backward, or index_add) rounds each record's terms
# relative to their sizes, ``~u_book * S_i`` per element, not to the record's norm N_i: a record
# with S_i / N_i = 2^30 moved a float32 step by ~32 C with a correct norm. The Gram bound keeps
# S_i / N_i <= sqrt(TAU / coef) (~13-40 in float32), but float64 Gram matrices allow far more, so
# records with u_book * S_i > BOOK_TAU * N_i are flagged too: in float32 (u = 2^-24) those with
# S_i / N_i > 256, which honest records (S / N ~ sqrt(T)) reach only beyond T ~ 65000. An
# unflagged record's terms are then rounded by ~2^-16 C each (against u M f_i |g| ~ 64 C before).
BOOK_TAU = 2.0**-16


def book_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the book-keeping call the rules make in ``dtype``: they run it inside
    :func:`full_precision` (``conv=True`` for convolutions), because TF32 (2^-11) or bf16 (2^-8)
    input rounding there would let any record with ``S / N`` beyond a few exceed C by a
    percent or more (its terms rounded relative to S, its factor from N), and flagging on that
    basis would flag nearly every record. The price on GPUs with TF32 enabled: an IEEE float32
    weight-gradient call instead of a TF32 one."""
    return U64 if dtype == torch.float64 else U32


def round_up(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``v`` (float64) converted to ``dtype``, never below ``v`` (next float up where the
    conversion rounded down)."""
    if dtype == torch.float64:
        return v
    w = v.to(dtype)
    low = w.double() < v
    # on the CPU a check skips the where when nothing rounded down; elsewhere no host sync
    if v.device.type != "cpu" or bool(low.any()):
        w = torch.where(low, torch.nextafter(w, torch.full_like(w, math.inf)), w)
    return w


def scaled_up(v: Tensor, factor: float) -> Tensor:
    """``v * factor`` never below the exact product (float64 product, rounded up to v's dtype)."""
    return round_up(v.double() * _up(factor), v.dtype)


# The matmul backends with an ``fp32_precision`` setting (module objects: found once).
_MATMUL_BACKENDS = [b for b in (getattr(torch.backends.cuda, "matmul", None),
                                getattr(getattr(torch.backends, "mkldnn", None), "matmul", None))
                    if b is not None and hasattr(b, "fp32_precision")]


@contextlib.contextmanager
def full_precision(conv: bool = False):
    """IEEE float32 matmuls inside (no TF32 / bf16 input rounding, which the bounds do not
    cover); with ``conv``, cuDNN convolutions without TF32 too (``torch.backends.cudnn
    .allow_tf32``, on by default). The caller's settings are restored after; a no-op under
    torch's defaults for matmuls ('highest') and on machines without cuDNN for convolutions."""
    saved = [(b, b.fp32_precision) for b in _MATMUL_BACKENDS]
    prec = torch.get_float32_matmul_precision()
    matmul_ok = prec == "highest" and all(v in ("none", "ieee") for _, v in saved)
    cudnn = torch.backends.cudnn
    conv_tf32 = conv and cudnn.is_available() and bool(cudnn.allow_tf32)
    if matmul_ok and not conv_tf32:
        yield
        return
    if not matmul_ok:
        torch.set_float32_matmul_precision("highest")
    if conv_tf32:
        cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if not matmul_ok:
            torch.set_float32_matmul_precision(prec)
            for b, v in saved:
                b.fp32_precision = v
        if conv_tf32:
            cudnn.allow_tf32 = True


def split_factors(factors: Tensor, flagged: Tensor | None) -> Tensor:
    """The factors for the book-keeping matmul: exactly 0 for the ``flagged`` records (whose
    clipped gradients are added separately from their materialised gradients)."""
    if flagged is None or flagged.numel() == 0:
        return factors
    f = factors.clone()
    f[flagged] = 0
    return f


def exact_sq_norms(grads: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Squared norms of materialised per-sample gradients ``grads`` (k, ...), summed in float64
    (the squares of float32 numbers are exact there; relative error ``gamma_n(2^-53)``, covered)
    and rounded upward to ``out_dtype``: the norm of exactly what the clipped sum adds."""
    flat = grads.flatten(1).double()
    sq = flat.square().sum(1) * _up(1.0 + gamma(flat.shape[1] + 1, U64))
    return round_up(sq, out_dtype)


def exact_sq_norms_rows(
    rows: tuple[Tensor, Tensor, Tensor], k: int, out_dtype: torch.dtype
) -> Tensor:
    """:func:`exact_sq_norms` for gradients stored as summed rows ``(record (m,), vocabulary row
    (m,), rows (m, D))`` of ``k`` records (the embedding's sparse per-sample gradients)."""
    rec, _, vals = rows
    flat = vals.double()
    per_row = flat.square().sum(1)
    sq = per_row.new_zeros(k).index_add_(0, rec, per_row)
    sq = sq * _up(1.0 + gamma(flat.shape[1] + rec.shape[0] + 1, U64))
    return round_up(sq, out_dtype)


# A Gram path runs in float64 when float32's bound would reach TAU / GRAM64_MARGIN of the norm
# of a typical honest record (see gram_dtype).
GRAM64_MARGIN = 8


def gram_dtype(dtype: torch.dtype, positions: int, lengths: tuple[int, ...]) -> torch.dtype:
    """The dtype to form the Gram matrices in: float64 for float64 inputs; for float32 inputs
    float32 while ``GRAM64_MARGIN * (sum_k gamma_len_k + gamma_T) * T <= TAU`` (T = positions),
    else float64.

    Why: for honest records the terms do not cancel on purpose, but they are not aligned either:
    with positions of independent directions ``N^2 ~ sum_t ||x_t||^2 ||g_t||^2 >= S^2 / T``
    (equality at equal sizes), so the bound is ``~ coef * T`` of N'^2. Measured on random data: the
    over-estimate was (gamma_d + gamma_p) T within 2% at the shapes of linear.py's table. Where that
    product nears TAU (long sequences and wide layers: B=8 T=128 d=p=1024 in float32 gives 0.016),
    every honest record would be flagged and materialised in float64; forming the Gram matrices in
    float64 instead costs ~2.7x the float32 Gram matmuls on the dev CPU (8.8 vs 3.2 ms at that
    shape; the same peak rate on A100/H100, whose float32 runs without TF32 here anyway) and makes
    the bound ~1e-13 relative."""
    if dtype == torch.float64:
        return torch.float64
    return _gram_dtype(dtype, int(positions), tuple(int(n) for n in lengths), TAU, GRAM64_MARGIN)


@functools.lru_cache(maxsize=4096)
def _gram_dtype(dtype, positions: int, lengths: tuple[int, ...], tau: float, margin: float):
    u = unit_roundoff(dtype)
    predicted = (sum(gamma(n, u) for n in lengths) + gamma(positions, u)) * positions
    return torch.float32 if margin * predicted <= tau else torch.float64
