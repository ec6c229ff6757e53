"""A one-run audit (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846) of every noise mechanism of
``PrivacyEngine.make_private``: DP-SGD with Poisson or shuffled batches, tree aggregation and
banded matrix factorization (fixed order or cyclic Poisson), for the privacy-utility benchmark
(:mod:`ppml_fast.benchmarks.privacy_utility`).

``ppml_fast.audit.audit_dp_sgd`` cannot audit correlated noise: its canaries join every step
with probability q (a Poisson model) and it rebuilds the optimizer without the engine's
correlated-noise plan. Here the engine builds :class:`CanaryDPOptimizer` itself
(``make_private(optimizer_class=...)``), so the audited step is the one the benchmark trains with.

Canaries are gradient-space "dirac" records (Nasr et al. 2023, section 4): canary i is the
clipping norm C times a one-hot vector on its own model coordinate, included in the data with
probability 1/2, and it takes part in the steps the loader would give a record:

- Poisson DP-SGD: each step with probability q;
- fixed order (tree, BandMF, DP-SGD shuffle=False): one position i, steps i, i + K, i + 2K, ...;
- shuffled: one uniformly random step in each epoch (the honest shuffled account claims no
  amplification, so the auditor may know the positions: the claim covers any fixed order);
- cyclic Poisson (amplified BandMF): a uniform part r of b; steps t = r mod b with probability q.

The auditor is white box: after each step it reads the noisy gradient at the canary
coordinates and subtracts the other records' clipped sum there (the sampling of the other
records is independent of the canaries, so seeing it costs the claim nothing). What is left,
in units of C, is y = u + sigma w: u the canary's participations, w the mechanism's noise with
covariance M M^T (M from the strategy; identity for DP-SGD). The score is the exact
log-likelihood ratio of "included" against "not": u^T (M M^T)^{-1} y - u^T (M M^T)^{-1} u / 2
(over sigma^2) for known participations; the Poisson mixture per step for DP-SGD; per round for
cyclic Poisson after whitening by C = M^{-1} (b-banded C, rounds b apart: disjoint rows,
independent). The lower bound is :func:`ppml_fast.audit.one_run_audit`'s.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ppml_fast.audit import DiracCanaries, one_run_audit
from ppml_fast.audit.canaries import poisson_gaussian_llr
from ppml_fast.privacy.optimizer import DPOptimizer
from ppml_fast.privacy.per_sample import sum_dtype


class CanaryDPOptimizer(DPOptimizer):
    """A :class:`DPOptimizer` that adds dirac canaries to the clipped sum by a plan of joins
    (T, m) and records, per step, y = (noisy gradient sum - other records' clipped sum) / C at
    the canary coordinates. Call :meth:`setup_canaries` before the first step."""

    def setup_canaries(self, canaries: DiracCanaries, joins: np.ndarray) -> None:
        if self.clipping == "per_layer":
            raise ValueError("CanaryDPOptimizer supports flat clipping only")
        self.canaries, self.canary_joins = canaries, np.asarray(joins, dtype=bool)
        self.canary_y: list[torch.Tensor] = []
        self._canary_other: Optional[torch.Tensor] = None
        self.step_hooks.append(CanaryDPOptimizer._observe)

    def clip_and_accumulate(self) -> None:
        super().clip_and_accumulate()
        if self._skip_next or not hasattr(self, "canaries"):
            return
        sums = [self._summed.get(p) for p in self.params]
        self._canary_other = self.canaries.gather([torch.zeros_like(p) if s is None else s
                                                   for p, s in zip(self.params, sums)])
        if self.steps >= self.canary_joins.shape[0]:
            return  # beyond the plan: the engine refuses the step (correlated) or nothing joins
        idx = torch.from_numpy(np.nonzero(self.canary_joins[self.steps])[0])
        c = float(self.max_grad_norm)
        for k, p in enumerate(self.params):
            sel = idx[self.canaries.param_index[idx] == k]
            if sel.numel() == 0:
                continue
            s = self._summed.get(p)
            s = torch.zeros_like(p, dtype=sum_dtype(p)) if s is None else s.contiguous()
            s.view(-1).index_add_(0, self.canaries.flat_index[sel],
                                  torch.full((sel.numel(),), c, dtype=s.dtype))
            self._summed[p] = s

    @staticmethod
    def _observe(opt: "CanaryDPOptimizer") -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in opt.params]
        noisy = opt.canaries.gather(grads) * opt.expected_batch_size
        opt.canary_y.append((noisy - opt._canary_other) / float(opt.max_grad_norm))


def plan_joins(kind: str, *, steps: int, canaries: int, included: np.ndarray, rng: np.random.Generator,
               steps_per_epoch: int, sample_rate: float = 1.0, parts: int = 1) -> tuple[np.ndarray, dict]:
    """(joins (T, m) bool, what the scorer knows) for a participation ``kind``: "poisson",
    "every_epoch", "shuffled" or "cyclic_poisson" (module docstring). The scorer's knowledge is
    the potential participation u (T, m) for the known-position kinds, the parts for cyclic."""
    T, m, K = steps, canaries, steps_per_epoch
    t = np.arange(T)[:, None]
    if kind == "poisson":
        joins, known = rng.random((T, m)) < sample_rate, {}
    elif kind == "every_epoch":
        pos = rng.integers(0, K, m)
        joins = (t % K) == pos[None, :]
        known = {"u": joins.copy()}
    elif kind == "shuffled":
        epochs = -(-T // K)
        pos = rng.integers(0, K, (epochs, m)) + (np.arange(epochs) * K)[:, None]
        joins = np.zeros((T, m), dtype=bool)
        for e in range(epochs):
            ok = pos[e] < T
            joins[pos[e][ok], np.nonzero(ok)[0]] = True
        known = {"u": joins.copy()}
    elif kind == "cyclic_poisson":
        part = rng.integers(0, parts, m)
        joins = ((t % parts) == part[None, :]) & (rng.random((T, m)) < sample_rate)
        known = {"part": part}
    else:
        raise ValueError(f"kind must be poisson, every_epoch, shuffled or cyclic_poisson; got {kind!r}")
    return joins & included[None, :], known


def scores(kind: str, y: np.ndarray, known: dict, *, sigma: float, noise_matrix: Optional[np.ndarray],
           sample_rate: float = 1.0, parts: int = 1) -> np.ndarray:
    """The log-likelihood ratio per canary from observations ``y`` (T, m) (module docstring)."""
    s2 = sigma * sigma
    if kind == "poisson":
        return poisson_gaussian_llr(torch.from_numpy(y), sample_rate, torch.tensor(sigma)).numpy()
    T = y.shape[0]
    M = np.eye(T) if noise_matrix is None else noise_matrix
    if kind in ("every_epoch", "shuffled"):
        u = known["u"].astype(np.float64)
        P = np.linalg.pinv(M @ M.T, hermitian=True)  # (M M^T)^{-1}; the tree's M is T x nodes
        Pu = P @ u
        return ((Pu * y).sum(0) - 0.5 * (Pu * u).sum(0)) / s2
    C = np.linalg.inv(M)  # banded: M = C^{-1}
    x = C @ y
    out = np.zeros(y.shape[1])
    for i, r in enumerate(known["part"]):
        cols = C[:, r::parts]  # one column per round of part r
        a = cols.T @ x[:, i]
        n = (cols * cols).sum(0)
        out[i] = np.logaddexp(math.log1p(-sample_rate) if sample_rate < 1 else -np.inf,
                              math.log(sample_rate) + (a - n / 2) / s2).sum()
    return out


def audit_run(optimizer: CanaryDPOptimizer, kind: str, known: dict, included: np.ndarray, *,
              delta: float, sample_rate: float, parts: int, confidence: float = 0.95) -> dict:
    """The one-run bound of a finished run with canaries: dict of the bound and its counts."""
    y = torch.stack(optimizer.canary_y).numpy()
    if y.shape[0] != optimizer.canary_joins.shape[0]:
        raise ValueError(f"the run took {y.shape[0]} steps, its canary plan {optimizer.canary_joins.shape[0]}")
    corr = optimizer.correlated
    M = None if corr is None else corr.strategy.noise_matrix()
    sc = scores(kind, y, known, sigma=float(optimizer.noise_multiplier), noise_matrix=M,
                sample_rate=sample_rate, parts=parts)
    test = one_run_audit(sc, included, delta=delta, confidence=confidence)
    return {"epsilon_lower_bound": test.epsilon_lower_bound, "canaries": test.canaries,
            "guesses": test.guesses, "correct": test.correct, "confidence": confidence,
            "whitened_noise_var": whitened_variance(y[:, ~included], float(optimizer.noise_multiplier), M)}


def whitened_variance(y: np.ndarray, sigma: float, noise_matrix: Optional[np.ndarray]) -> float:
    """The variance of L^{-1} y / sigma over all entries, L the Cholesky factor of M M^T: 1 (to
    about sqrt(2 / y.size)) when the observations of canaries that never joined are exactly the
    noise the strategy claims, sigma w with Cov(w) = M M^T (an end-to-end check of the noise the
    optimizer adds against the factorization the accountant assumes)."""
    if noise_matrix is None:
        x = y / sigma
    else:
        L = np.linalg.cholesky(noise_matrix @ noise_matrix.T)
        from scipy.linalg import solve_triangular

        x = solve_triangular(L, y, lower=True) / sigma
    return float((x * x).mean())
