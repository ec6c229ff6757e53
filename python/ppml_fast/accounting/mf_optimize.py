"""Optimising a banded Toeplitz strategy for the prefix-sum workload (BandMF), with a cache.

Choquette-Choo et al. 2023 ("(Amplified) Banded Matrix Factorization", arXiv 2306.08153, Sec. 3-4)
minimise ||A C^{-1}||_F^2 over b-banded C with column norms <= 1; restricted to lower-triangular
Toeplitz C with coefficients c (McKenna 2024, arXiv 2405.15913, Sec. 3; jax_privacy
``toeplitz.optimize_banded_toeplitz``) the loss is scale-free:

    f(c) = ||c||^2 * sum_{i < T} (T - i) beta_i^2,   beta = L(c)^{-1} 1

(B = A L^{-1} is Toeplitz with first column beta; its row t has norm^2 sum_{i <= t} beta_i^2).
beta is the IIR recursion beta_i = (1 - sum_{m >= 1} c_m beta_{i-m}) / c_0, O(T b) (scipy lfilter),
and so is the gradient (adjoint: L^T is L reversed):
    d/dc_m sum w_i beta_i^2 = -2 sum_{i >= m} lambda_i beta_{i-m},  lambda = L^{-T} (w * beta).
Minimised (its log) with L-BFGS from the Fichtenberger-Henzinger-Upadhyay square-root
coefficients (arXiv 2202.11205), as jax_privacy does; the optima agree with jax_privacy's to 1e-9
(tests). Time O(iterations x T b): T = 10^4, b = 64 about 1 s. Cached per (T, b): in memory and on disk under
``$PPML_FAST_CACHE`` (default ``~/.cache/ppml_fast``)/matrix_factorization/. The cache only ever
affects utility: sensitivities are always computed from the coefficients actually used.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

_VERSION = 2  # 2: the L-BFGS with backtracking (version 1's scipy L-BFGS-B stopped early at large T)
_memory: dict = {}
_lock = threading.Lock()


def sqrt_coefficients(n: int) -> np.ndarray:
    """c_k = binom(2k, k) / 4^k: the Toeplitz square root of the prefix-sum matrix (C C = A),
    optimal for max error under single participation (arXiv 2202.11205; jax_privacy
    ``optimal_max_error_strategy_coefs``)."""
    k = np.arange(1, n)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def toeplitz_loss_and_grad(c: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """f(c) = ||c||^2 sum_i (T - i) beta_i^2 and its gradient (module docstring)."""
    from scipy.signal import lfilter
    c = np.asarray(c, dtype=np.float64)
    T, b = steps, c.size
    if not c[0] > 0:
        return np.inf, np.zeros(b)
    with np.errstate(all="ignore"):
        beta = lfilter([1.0], c, np.ones(T))
        w = np.arange(T, 0, -1, dtype=np.float64)
        wb = w * beta
        E = float(beta @ wb)
        if not np.isfinite(E) or E > 1e250:
            return np.inf, np.zeros(b)
        lam = lfilter([1.0], c, wb[::-1])[::-1]
        gE = np.array([-2.0 * (lam[m:] @ beta[: T - m]) for m in range(b)])
    n2 = float(c @ c)
    return n2 * E, 2.0 * c * E + n2 * gE


def _lbfgs(fg, x: np.ndarray, max_iter: int, memory: int = 20, tol: float = 1e-13) -> np.ndarray:
    """L-BFGS (Nocedal & Wright 2006, Alg. 7.4/7.5) with Armijo backtracking that treats a
    non-finite value as "too far": the loss is infinite where 1 / c(z) is unstable, right next to
    the optimum for large T, where scipy's L-BFGS-B line search stopped at the starting point
    (T = 10^4, b = 8: 36% above the optimum). Stops after 5 steps that gain < ``tol`` in f."""
    f, g = fg(x)
    S: list = []
    Y: list = []
    stall = 0
    for _ in range(max_iter):
        gn2 = float(np.linalg.norm(g))
        if not gn2 > 0:
            break
        q, alphas = g.copy(), []
        for s, y in reversed(list(zip(S, Y))):  # two-loop recursion
            a = (s @ q) / (y @ s)
            alphas.append(a)
            q -= a * y
        q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]) if S else 1e-1 / gn2
        for (s, y), a in zip(zip(S, Y), reversed(alphas)):
            q += s * (a - (y @ q) / (y @ s))
        d = -q
        if not g @ d < 0:  # not a descent direction: restart from the gradient
            S, Y, d = [], [], -g * (1e-1 / gn2)
        t = 1.0
        while True:
            x_new = x + t * d
            f_new, g_new = fg(x_new)
            if np.isfinite(f_new) and f_new <= f + 1e-4 * t * (g @ d):
                break
            t *= 0.5
            if t < 1e-20:
                return x
        s, y = x_new - x, g_new - g
        if s @ y > 1e-300:
            S.append(s)
            Y.append(y)
            if len(S) > memory:
                S.pop(0)
                Y.pop(0)
        stall = stall + 1 if f - f_new < tol else 0
        x, f, g = x_new, f_new, g_new
        if stall >= 5:
            break
    return x


def _optimize(steps: int, bands: int, max_iter: int) -> np.ndarray:
    """Minimise log f(c) (scale-free values and gradients) from the square-root coefficients."""
    x0 = sqrt_coefficients(bands)
    x0 = x0 / np.linalg.norm(x0)

    def fg(x):
        f, g = toeplitz_loss_and_grad(x, steps)
        if not (np.isfinite(f) and f > 0):
            return np.inf, None
        return np.log(f), g / f

    x = _lbfgs(fg, x0, max_iter)
    if not toeplitz_loss_and_grad(x, steps)[0] <= toeplitz_loss_and_grad(x0, steps)[0]:
        x = x0
    return x / np.linalg.norm(x)


def cache_dir() -> Path:
    """Where optimised strategies are kept: $PPML_FAST_CACHE or ~/.cache/ppml_fast, then
    matrix_factorization/."""
    root = os.environ.get("PPML_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ppml_fast")
    return Path(root) / "matrix_factorization"


def _path(steps: int, bands: int) -> Path:
    return cache_dir() / f"banded_toeplitz_T{steps}_b{bands}_v{_VERSION}.json"


def _valid(c: object, bands: int) -> Optional[np.ndarray]:
    try:
        c = np.asarray(c, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if c.shape != (bands,) or not np.all(np.isfinite(c)) or not c[0] > 0:
        return None
    if abs(float(np.linalg.norm(c)) - 1.0) > 1e-9:
        return None
    return c


def _load(steps: int, bands: int) -> Optional[np.ndarray]:
    try:
        with open(_path(steps, bands)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("steps") != steps or data.get("bands") != bands:
        return None
    return _valid(data.get("coefficients"), bands)


def _store(steps: int, bands: int, c: np.ndarray, loss: float) -> None:
    path = _path(steps, bands)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _VERSION, "steps": steps, "bands": bands, "loss": loss,
                       "coefficients": [float(v) for v in c]}, f)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except OSError:  # a read-only home: keep the in-memory result only
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def optimal_toeplitz_coefficients(steps: int, bands: int, *, max_iter: int = 2000,
                                  use_cache: bool = True) -> np.ndarray:
    """The unit-norm Toeplitz coefficients (length ``bands``) minimising ||A C^{-1}||_F^2 for
    T = ``steps``, from the memory cache, the disk cache, or L-BFGS (then stored in both)."""
    key = (steps, bands)
    if use_cache:
        with _lock:
            c = _memory.get(key)
        if c is None:
            c = _load(steps, bands)
            if c is not None:
                with _lock:
                    _memory[key] = c
        if c is not None:
            return c.copy()
    c = _optimize(steps, bands, max_iter)
    if use_cache:
        with _lock:
            _memory[key] = c
        _store(steps, bands, c, toeplitz_loss_and_grad(c, steps)[0])
    return c.copy()


def clear_memory_cache() -> None:
    """Forget the optimised strategies kept in memory (the disk cache stays)."""
    with _lock:
        _memory.clear()
