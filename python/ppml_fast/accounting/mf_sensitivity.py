"""Prefix sensitivities of matrix-factorization strategies: S_t for every step t at once.

S_t is the max, over the participation schema's patterns pi (sets of steps one record takes part
in), of the squared L2 sensitivity (per unit clipping norm) of the rows of C released by the end
of step t. For a pattern pi and Gram matrix X_t = C_t^T C_t (C_t: the released rows),

    sens_pi^2 = sup_{||g_j|| <= 1} || sum_{j in pi} C_t[:, j] g_j ||^2 <= sum_{i, j in pi} |X_t[i, j]|,

with equality when X_t[pi, pi] >= 0 elementwise (all g_j equal) (arXiv 2211.06530, Sec. 2, Eq. 5;
the absolute value for general X: arXiv 2306.08153, Sec. 2 and jax_privacy's
``fixed_epoch_sensitivity_for_X``). Each function returns S as a float64 array of length T, made
non-decreasing by a running max (releasing more rows never lowers the true sensitivity, and the
running max of upper bounds is still an upper bound).

The banded functions take the band of C as R[t, m] = C[t, t - m] (m < b; R[t, m] = 0 for m > t).
"""

from __future__ import annotations

import math

import numpy as np


def banded_periodic(R: np.ndarray, period: int) -> np.ndarray:
    """S_t for a banded lower-triangular C (band R, T x b) under the patterns {i, i + p, ...}
    (p = ``period``; p = T is single participation): max_i of sum_{j, k in pi_i, <= t}
    |X_t[j, k]|. Exact when those entries are >= 0, an upper bound otherwise. Only pairs
    with |j - k| < b and j = k (mod p) are non-zero, so a step updates O(b * ceil(b / p))
    entries of X: O(T b ceil(b / p)) in all."""
    T, b = R.shape
    p = int(period)
    D = np.arange(0, b, p)  # the offsets k - j that can be in one pattern
    # all (m1, m2) = (t - j, t - k) with k - j = d in D, m1 < b: the pairs row t touches
    m1 = np.concatenate([np.arange(d, b) for d in D])
    di = np.concatenate([np.full(b - d, i) for i, d in enumerate(D)])
    m2 = m1 - D[di]
    weight = np.where(D[di] == 0, 1.0, 2.0)  # (j, k) and (k, j)
    X = np.zeros((T, len(D)))  # X[j, i] = X_t[j, j + D[i]]
    V = np.zeros(p)  # V[r] = sum over the pattern of residue r
    out = np.empty(T)
    S = 0.0
    for t in range(T):
        keep = m1 <= t
        a, c, w, e = m1[keep], m2[keep], weight[keep], di[keep]
        j = t - a
        old = X[j, e]
        new = old + R[t, a] * R[t, c]
        X[j, e] = new
        res = j % p
        np.add.at(V, res, w * (np.abs(new) - np.abs(old)))
        S = max(S, float(V[res].max()))
        out[t] = S
    return out


def banded_min_separated(R: np.ndarray, min_separation: int, max_participations: int) -> np.ndarray:
    """S_t for a banded C (band R, T x b) under b'-min-separated participation with
    b' = ``min_separation`` >= b and at most k = ``max_participations`` steps: columns of C
    more than b - 1 apart are orthogonal, so sens_pi^2 = sum_{j in pi} ||C_t[:, j]||^2 exactly
    (arXiv 2306.08153, Sec. 4, Thm. 2 with b-banded C; its Alg. 3, VecSens, maximises it).

    At step t the columns j <= t - b + 1 are complete (norms d[j]); at most one pattern element
    lies in the incomplete window (t - b + 1, t] (its width is < b <= b'). So
    S_t = max(H(t - b + 1, k), max_{j in window} d_t[j] + H(j - b', k - 1)), H(u, m) the best
    sum of complete norms over patterns in [0, u] with at most m elements (a forward DP kept in
    a ring buffer of b' + b rows). O(T (k + b)) time."""
    T, b = R.shape
    sep, k = int(min_separation), int(max_participations)
    if sep < b:
        raise ValueError(f"banded_min_separated needs min_separation >= bands; got {sep} < {b}")
    sq = R * R
    dfull = np.zeros(T)  # complete column norms^2: d[j] = sum_m C[j + m, j]^2
    for m in range(b):
        dfull[: T - m] += sq[m:, m]
    L = sep + b + 1
    ring = np.zeros((L, k + 1))  # ring[u % L] = H(u, 0..k)
    zero = np.zeros(k + 1)
    dcur = np.zeros(T)  # d_t[j]
    out = np.empty(T)
    S = 0.0
    for t in range(T):
        kk = min(b, t + 1)
        dcur[t - np.arange(kk)] += sq[t, :kk]
        u = t - b + 1
        if u >= 0:  # column u just became complete
            prev = ring[(u - 1) % L] if u >= 1 else zero
            back = ring[(u - sep) % L] if u >= sep else zero
            h = prev.copy()
            h[1:] = np.maximum(h[1:], dfull[u] + back[:-1])
            ring[u % L] = h
            best = h[k]
        else:
            best = 0.0
        js = np.arange(max(u + 1, 0), t + 1)
        if js.size:
            idx = js - sep
            hv = np.where(idx >= 0, ring[idx % L, k - 1], 0.0)
            best = max(best, float((dcur[js] + hv).max()))
        S = max(S, best)
        out[t] = S
    return out


def banded_shuffled(R: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    """S_t for a banded C (band R, T x b) when each epoch [e p, (e + 1) p) is a fresh shuffle:
    a record is in at most one step of each epoch, anywhere in it (p = ``steps_per_epoch``).
    Needs p >= b - 1: then steps two epochs apart are >= b apart (orthogonal columns) and only
    neighbouring epochs interact, so max_pi sum_{j, k in pi} |X_t[j, k]| is a dynamic program over
    epochs, F_e(k) = X[k, k] + A_e(k), A_e(k) = max(max F_{e-1}, max_{j: k - j < b} F_{e-1}(j) +
    2 |X[j, k]|) (an element in every epoch is never worse: every term is >= 0). Exact when
    those X entries are >= 0 (banded Toeplitz with c >= 0, as optimised), an upper bound
    otherwise. At step t of epoch e, A_{e-1} is final (its cross terms and F_{e-2} are
    complete), so F_{e-1} = X[k, k] + A_{e-1}; A_e is final from step e p + b - 2 on, after which
    a step only raises X[k, k] of its last b columns: O(T b + (T / p) b (p + b^2)) (cross terms
    are kept only for pairs across an epoch boundary, the only ones the program reads)."""
    T, b = R.shape
    p = int(steps_per_epoch)
    if p < b - 1:
        raise ValueError(f"banded_shuffled needs steps_per_epoch >= bands - 1; got {p} < {b - 1}")
    dg = np.zeros(T)  # X_t[j, j]
    X = np.zeros((T, b))  # X[j, d] = X_t[j, j + d], kept for pairs across an epoch boundary only
    U, O = np.meshgrid(np.arange(b - 1), np.arange(b - 1), indexing="ij")
    gap = O + 1 + U  # k - j for j = e p - 1 - u (previous epoch), k = e p + o
    mask = gap < b
    gidx = np.where(mask, gap, 0)

    def a_vector(e: int, prev) -> np.ndarray:
        """A_e over epoch e (prev = F_{e-1}, a full epoch; None for e = 0)."""
        n_e = min((e + 1) * p, T) - e * p
        if prev is None:
            return np.zeros(n_e)
        M = float(prev.max())
        A = np.full(n_e, M)
        n = min(b - 1, n_e)
        if n:
            cross = prev[p - 1 - U] + 2.0 * np.abs(X[e * p - 1 - U, gidx])
            A[:n] = np.maximum(M, np.where(mask, cross, -np.inf).max(axis=0)[:n])
        return A

    A = A_last = np.zeros(0)  # A_e of the current epoch; A_{e-1}, final once epoch e began
    out = np.empty(T)
    S = 0.0
    for t in range(T):
        kk = min(b, t + 1)
        r = R[t, :kk]
        dg[t - np.arange(kk)] += r * r
        e = t // p
        start = e * p
        if t == start and e >= 1:
            A_last = A
        if 0 < start and start > t - b + 1:  # row t holds pairs across the epoch boundary
            js = np.arange(max(t - b + 1, 0), start)
            ks = np.arange(start, t + 1)
            J, K = np.meshgrid(js, ks, indexing="ij")
            ok = K - J < b
            X[J[ok], (K - J)[ok]] += r[t - J[ok]] * r[t - K[ok]]
        if t <= start + b - 1:  # F_{e-1} and A_e may still change: recompute, all of [start, t]
            prev = dg[start - p:start] + A_last if e >= 1 else None
            A = a_vector(e, prev)
            lo = start
        else:  # only the last b columns' norms grew
            lo = max(start, t - b + 1)
        S = max(S, float((dg[lo:t + 1] + A[lo - start:t + 1 - start]).max()))
        out[t] = S
    return out


def tree_shuffled(steps: int, steps_per_epoch: int) -> np.ndarray:
    """An upper bound on S_t for tree aggregation under per-epoch shuffling (at most one step in
    each epoch of p steps): the packing bound of ``tree_min_separated`` with k_t = t // p + 1
    epochs begun and at most min(k_t, s, ceil((s - 1) / p) + 1) elements in a node of s steps
    (the epochs it can touch)."""
    T, p = int(steps), int(steps_per_epoch)
    out = np.empty(T)
    S = 0.0
    for t in range(T):
        kt = t // p + 1
        total, s = 0, 1
        while s <= t + 1:
            nh = (t + 1) // s
            mh = min(kt, s, -(-(s - 1) // p) + 1)
            full = min(nh, kt // mh)
            rem = kt - full * mh
            total += full * mh * mh + (rem * rem if full < nh else 0)
            s *= 2
        S = max(S, float(total))
        out[t] = S
    return out


def tree_node_count(steps: int) -> int:
    """The number of complete dyadic nodes [m 2^h, (m + 1) 2^h) inside [0, steps)."""
    n, s = 0, 1
    while s <= steps:
        n += steps // s
        s *= 2
    return n


def tree_periodic(steps: int, period: int) -> np.ndarray:
    """S_t for binary-tree aggregation (C: one row per dyadic node, 1 on its steps; released
    when its last step is done) under the patterns {i, i + p, ...}: X = C^T C >= 0, so
    sens_pi^2 = sum over released nodes of |pi n node|^2 exactly. A node [a, a + s), s = q p + r,
    holds q + [(i - a) mod p < r] elements of pattern i. O(T log T) in all."""
    T, p = int(steps), int(period)
    V = np.zeros(p)
    base = 0.0  # added to every residue
    M = 0.0  # max_i V[i] + base
    out = np.empty(T)
    for t in range(T):
        s = 1
        while (t + 1) % s == 0:
            a = t + 1 - s
            q, r = divmod(s, p)
            base += q * q
            M += q * q
            if r:
                idx = (a + np.arange(r)) % p
                V[idx] += 2 * q + 1
                M = max(M, float(V[idx].max()) + base)
            s *= 2
        out[t] = M
    return out


def tree_min_separated(steps: int, min_separation: int, max_participations: int) -> np.ndarray:
    """An upper bound on S_t for tree aggregation under min-separated participation: at level h
    (nodes of 2^h steps, n_h = floor((t + 1) / 2^h) released) a pattern of at most
    k_t = min(k, ceil((t + 1) / b')) steps, b' apart, has at most m_h = min(k_t, ceil(2^h / b'))
    elements in a node, so sum_nodes |pi n node|^2 <= the best packing of k_t elements into
    n_h nodes of capacity m_h. Exact for one participation; an upper bound otherwise (X >= 0,
    the exact value is a max over patterns that this relaxes)."""
    T, sep, k = int(steps), int(min_separation), int(max_participations)
    out = np.empty(T)
    S = 0.0
    for t in range(T):
        kt = min(k, -(-(t + 1) // sep))
        total, s = 0, 1
        while s <= t + 1:
            nh = (t + 1) // s
            mh = min(kt, -(-s // sep))
            full = min(nh, kt // mh)
            rem = kt - full * mh
            total += full * mh * mh + (rem * rem if full < nh else 0)
            s *= 2
        S = max(S, float(total))
        out[t] = S
    return out


def banded_column_norms_sq(R: np.ndarray) -> np.ndarray:
    """||C[:, j]||^2 for the banded C with band R (all rows released)."""
    T, b = R.shape
    d = np.zeros(T)
    for m in range(b):
        d[: T - m] += R[m:, m] ** 2
    return d


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b) if b > 0 else math.inf
