"""A certified upper bound on log A_alpha of the Poisson-subsampled Gaussian mechanism at
fractional orders alpha: the exact two-series expansion of Mironov, Talwar, Zhang 2019, summed
with signs, its truncated tail bounded by the alternating-series (Leibniz) test, and an
allowance for floating-point error added. Pure functions on floats (rdp_math.py calls this).

The series (Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", arXiv:1908.10530, Section 3.3, the fractional-alpha computation; the same terms as
dp_accounting's and Opacus's ``_compute_log_a_frac``). With mu0 = N(0, sigma^2),
mu1 = N(1, sigma^2), mu = (1 - q) mu0 + q mu1, A_alpha = E_{z~mu0}[(mu(z) / mu0(z))^alpha] and
z0 = sigma^2 log(1/q - 1) + 1/2 (where (1 - q) mu0 = q mu1), expanding (1 - q + q mu1/mu0)^alpha
binomially on z <= z0 and (q + (1 - q) mu0/mu1)^alpha on z >= z0 gives

    A_alpha = sum_{i >= 0} C(alpha, i) (a_i + b_i),                                        (S)
    a_i = q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2)) erfc((i - z0) / (sqrt2 sigma)) / 2
        = (1-q)^alpha  int_{z <= z0} mu0 r^i,      r = q mu1 / ((1 - q) mu0) in (0, 1] there,
    b_i = q^(alpha-i) (1-q)^i exp((j^2 - j) / (2 sigma^2)) erfc((z0 - j) / (sqrt2 sigma)) / 2,
          j = alpha - i,
        = int_{z >= z0} (q mu1)^alpha mu0^(1-alpha) s^i,  s = (1 - q) mu0 / (q mu1) in (0, 1] there.

Why the truncation can be certified (our argument, from the integral forms above): r, s <= 1 on
their half-lines, so a_i and b_i are non-increasing in i; |C(alpha, i+1)| / |C(alpha, i)| =
|alpha - i| / (i + 1) < 1 for i > (alpha - 1) / 2; and C(alpha, i) > 0 for i <= floor(alpha) + 1,
then alternates in sign. So from i0 = floor(alpha) + 1 on, the terms t_i = C(alpha, i)(a_i + b_i)
alternate with non-increasing magnitude tending to 0, and by the alternating series (Leibniz)
test the sum lies between S_n and S_n + t_(n+1):  A_alpha <= S_n + max(0, t_(n+1)).
dp_accounting sums |t_i| instead (an upper bound, but up to 2x looser in epsilon at large
epsilon, where it also fails to converge in 1000 terms and drops the order); Opacus sums with
signs and stops when the terms fall below e^-30 (no bound on what is left).

Floating point: each term is computed in log space from components c_k (log-gammas, i log q,
(i^2 - i) / (2 sigma^2), log erfc, ...); the computed log of C(alpha, i), a_i and b_i is taken
to be within 16 u (sum_k |c_k| + 2) of the exact one (u = 2^-52; a term's: the coefficient's
plus a_i's and b_i's weighted by their shares of the term; the functions used are accurate to a
few ulps of their value, and the arguments' own rounding moves log erfc(x) by about
2 x^2 u ~ 2 |log erfc| u). The sum's allowance is sum_i |t_i| (e^delta_i - 1), plus the
rounding of the n-term log-space accumulations of the positive (P) and negative (N) parts
(``_acc_rounding``), plus 4 u (P + N) for their final combination. All are added to the
result: it stays an upper bound also where A_alpha - 1 is below the rounding level
(q ~ 1e-8), where it is merely loose and the integer orders (rdp_math._log_a_int) set epsilon.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

_U = float(np.finfo(float).eps)
_DELTA_FACTOR = 16.0 * _U
# Terms are computed in chunks (indices [start, start + n)), for the orders still open, each
# chunk at most _MAX_CELLS values; a series that has not met the tolerance after _MAX_TERMS
# terms returns its certified bound at that point (valid, only less tight).
_CHUNKS = (32, 96, 384, 1536, 6144, 24576)
_MAX_TERMS = sum(_CHUNKS)
_MAX_CELLS = 1 << 20
REL_TOL = 1e-7  # stop once the tail bound is below this fraction of A_alpha - 1


def _terms(q: float, sigma: float, alphas: np.ndarray, start, n: int):
    """(log|t_i|, sign of t_i, delta_i) for i = start .. start + n - 1, one row per order
    (``start``: one index for all, or one per order)."""
    A = alphas[:, None]
    I = np.reshape(np.asarray(start, dtype=np.float64), (-1, 1)) + np.arange(n, dtype=np.float64)[None, :]
    J = A - I
    g_a, g_i, g_j = special.gammaln(A + 1), special.gammaln(I + 1), special.gammaln(J + 1)
    log_coef = g_a - g_i - g_j  # log|C(alpha, i)|; gammaln is log|Gamma| (J + 1 never an integer)
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    x0 = (I - z0) / (math.sqrt(2.0) * sigma)
    x1 = (z0 - J) / (math.sqrt(2.0) * sigma)
    e0 = math.log(2.0) + special.log_ndtr(-x0 * math.sqrt(2.0))  # log erfc(x0)
    e1 = math.log(2.0) + special.log_ndtr(-x1 * math.sqrt(2.0))
    p0, p1 = I * log_q, J * log_1mq
    p2, p3 = J * log_q, I * log_1mq
    s0 = (I * I - I) / (2 * sigma**2)
    s1 = (J * J - J) / (2 * sigma**2)
    la = p0 + p1 + s0 + math.log(0.5) + e0  # log a_i
    lb = p2 + p3 + s1 + math.log(0.5) + e1  # log b_i
    log_t = log_coef + np.logaddexp(la, lb)
    k = I - np.floor(A)  # i - floor(alpha): positive up to 1, then alternating
    sign = np.where(k <= 1, 1.0, np.where(np.mod(k, 2) == 0, -1.0, 1.0))
    # log error: the coefficient's, plus a's and b's weighted by their shares of a + b (a part
    # that is e^-1e8 of the term may carry a huge log with no effect on the sum)
    d_a = _DELTA_FACTOR * (np.abs(p0) + np.abs(p1) + np.abs(s0) + np.abs(e0) + 2.0)
    d_b = _DELTA_FACTOR * (np.abs(p2) + np.abs(p3) + np.abs(s1) + np.abs(e1) + 2.0)
    w_a = np.exp(la - np.logaddexp(la, lb))
    delta = (_DELTA_FACTOR * (np.abs(g_a) + np.abs(g_i) + np.abs(g_j) + 2.0)
             + w_a * d_a + (1.0 - w_a) * d_b)
    return log_t, np.broadcast_to(sign, log_t.shape), delta


def _acc_rounding(n: np.ndarray, log_s: np.ndarray, log_first: np.ndarray) -> np.ndarray:
    """log of a bound on the relative error of an n-term running log-sum-exp S_n whose first
    term is e^log_first: each step x + log1p(e^(y - x)) errs by u |log S_k| (the rounded sum)
    plus 2 u log1p(e^(y - x)) <= 2 u t_k / S_(k-1); the partial sums lie between the first
    term and S_n, so the total is at most u (n max(|log t_first|, |log S_n|) + 2 S_n / t_first
    + 2), doubled here for the error on the error."""
    with np.errstate(invalid="ignore", over="ignore"):
        lf = np.where(np.isfinite(log_first), log_first, 0.0)
        ls = np.where(np.isfinite(log_s), log_s, lf)
        c = 2 * _U * (n * np.maximum(np.abs(lf), np.abs(ls)) + 2 * np.exp(np.minimum(ls - lf, 700)) + 2)
    return np.log(c)


def _log_sub_pos(log_x: float, log_y: float) -> float:
    """log(e^x - e^y) for x >= y (-inf when equal)."""
    if log_y == -math.inf:
        return log_x
    if log_y >= log_x:
        return -math.inf
    return log_x + math.log(-math.expm1(log_y - log_x))


def _log_a_upper(log_p: float, log_n: float, log_extra: float) -> float:
    """log(P - N + extra), P = e^log_p >= 1 (the i = 0, 1 terms), computed as log1p of
    (P - 1) - N + extra where that is small, so a tiny A - 1 keeps its relative precision."""
    if log_p < 30.0:
        v = math.expm1(log_p) - math.exp(log_n) + math.exp(log_extra)
        return math.log1p(v) if v >= 0.0 else math.inf  # A >= 1: else a bug; drop the order
    out = _log_sub_pos(float(np.logaddexp(log_p, log_extra)), log_n)
    return out if out >= 0.0 else math.inf  # A >= 1: anything else is a bug; drop the order


def log_a_frac_upper(q: float, sigma: float, alphas: np.ndarray, rel_tol: float = REL_TOL) -> np.ndarray:
    """Certified upper bounds on log A_alpha for fractional orders ``alphas`` (> 1), 0 < q < 1
    (the module docstring gives the series, the tail bound and the rounding allowance).

    A series stops at the first n >= floor(alpha) + 1 where its tail bound |t_(n+1)| is below
    ``rel_tol`` (A_alpha - 1) or below the rounding allowance, or after 32,768 terms; the
    result is S_n + max(0, t_(n+1)) + allowance wherever it stops."""
    alphas = np.asarray(alphas, dtype=np.float64)
    m = len(alphas)
    out = np.full(m, math.inf)
    log_p = np.full(m, -math.inf)  # running log of the positive terms' sum
    log_n = np.full(m, -math.inf)  # ... of the negative terms' magnitudes
    log_e = np.full(m, -math.inf)  # ... of the per-term rounding allowance sum |t_i| (e^d_i - 1)
    count = np.zeros(m, dtype=np.int64)
    # log of the first term of each accumulation: t_0 (positive) and t_(floor(alpha) + 2)
    first_p = _terms(q, sigma, alphas, 0, 1)[0][:, 0]
    first_n = _terms(q, sigma, alphas, np.floor(alphas) + 2, 1)[0][:, 0]
    open_rows = np.arange(m)
    start = 0
    for size in _CHUNKS:
        if not len(open_rows):
            break
        last = size == _CHUNKS[-1]
        step = max(1, _MAX_CELLS // (size + 1))
        still_open = []
        for b in range(0, len(open_rows), step):
            rows = open_rows[b:b + step]
            log_t, sign, delta = _terms(q, sigma, alphas[rows], start, size + 1)  # +1: lookahead
            lt, sg, dl = log_t[:, :-1], sign[:, :-1], delta[:, :-1]
            # over: a term's rounding allowance e^d - 1 overflows for tiny sigma (~1e-3); it is
            # then +inf, and so is that order's bound (dropped: conservative), without a warning
            with np.errstate(invalid="ignore", over="ignore"):
                cp = np.logaddexp.accumulate(np.where(sg > 0, lt, -np.inf), axis=1)
                cn = np.logaddexp.accumulate(np.where(sg < 0, lt, -np.inf), axis=1)
                ce = np.logaddexp.accumulate(lt + np.log(np.expm1(dl)), axis=1)
            cp = np.logaddexp(log_p[rows, None], cp)
            cn = np.logaddexp(log_n[rows, None], cn)
            ce = np.logaddexp(log_e[rows, None], ce)
            nterms = count[rows, None] + np.arange(1, size + 1)[None, :]
            # rounding of the two accumulations (_acc_rounding), and of the final combination
            # (a few u of P + N)
            acc_err = np.logaddexp(cp + _acc_rounding(nterms, cp, first_p[rows, None]),
                                   cn + _acc_rounding(nterms, cn, first_n[rows, None]))
            acc_err = np.logaddexp(acc_err, math.log(4 * _U) + np.logaddexp(cp, cn))
            ce_all = np.logaddexp(ce, acc_err)
            nxt_log, nxt_sign, nxt_d = log_t[:, 1:], sign[:, 1:], delta[:, 1:]
            tail = np.where(nxt_sign > 0, nxt_log + nxt_d, -np.inf)  # max(0, t_(n+1)), rounded up
            idx = np.arange(start, start + size)[None, :]
            alt = idx >= np.floor(alphas[rows])[:, None] + 1  # Leibniz applies from i0 on
            with np.errstate(invalid="ignore", over="ignore"):
                est = np.where(cp < 30, np.expm1(cp) - np.exp(cn), np.inf)  # ~ A - 1
                small = (nxt_log + nxt_d <= np.log(rel_tol) + np.log(np.maximum(est, 1e-300)))
                small |= nxt_log + nxt_d <= ce_all
            stop = alt & small
            if last:
                stop[:, -1] = True
            done = stop.any(axis=1)
            first = stop.argmax(axis=1)
            for r, row in enumerate(rows):
                if done[r]:
                    k = first[r]
                    extra = np.logaddexp(ce_all[r, k], tail[r, k])
                    out[row] = _log_a_upper(float(cp[r, k]), float(cn[r, k]), float(extra))
                else:
                    log_p[row], log_n[row], log_e[row] = cp[r, -1], cn[r, -1], ce[r, -1]
                    count[row] += size
                    still_open.append(row)
        open_rows = np.asarray(still_open, dtype=np.int64)
        start += size
    return out
