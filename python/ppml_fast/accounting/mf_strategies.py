"""Noise strategies of matrix-factorization mechanisms (DP-FTRL, banded MF): the strategy matrix C
of a factorisation A = B C of the prefix-sum workload A (T x T lower-triangular ones).

The mechanism releases C x + z, z iid N(0, sigma^2 Clip^2) per row; the optimizer sees its
gradient-space noise w (for square lower-triangular C: w = C^{-1} z), so that the prefix sums of
the noisy gradients are A x + B z (Denisov et al. 2022, arXiv 2202.08312, Sec. 2; Choquette-Choo
et al. 2023, arXiv 2211.06530 and 2306.08153). Privacy: the release of the first t + 1 rows is the
Gaussian mechanism with squared sensitivity S_t (``sensitivity_sq_prefix``), also when the x_t are
chosen adaptively from earlier outputs (Denisov et al. 2022, Sec. 2, for lower-triangular C;
multi-participation: arXiv 2211.06530, Sec. 2). Pure numpy; imports nothing from the training code.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

from ppml_fast.accounting import _checks, mf_sensitivity
from ppml_fast.accounting.events import Event, GaussianEvent, PoissonSampledEvent, SelfComposedEvent
from ppml_fast.accounting.mf_participation import Participation

_MAX_DENSE = 4096  # matrix() / noise_matrix() refuse larger T (T^2 doubles)


def _step(name: str, t: object, steps: int, low: int = 0) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(t).__name__} {t!r}")
    if not low <= t < steps:
        raise ValueError(f"{name} must be in [{low}, {steps - 1}] (steps={steps}); got {t!r}")
    return int(t)


def _participation(p: object) -> Participation:
    if not isinstance(p, Participation):
        raise TypeError(f"participation must be a Participation; got {type(p).__name__} {p!r}")
    return p


class NoiseStrategy:
    """A strategy matrix C for T = ``steps`` steps (immutable). ``kind`` is "identity"
    (DP-SGD's independent noise), "banded" (b-banded lower-triangular C) or "tree" (binary-tree
    aggregation); ``bands`` is b (1 for identity, None for the tree)."""

    kind: str
    steps: int
    bands: Optional[int]

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _init(self, kind: str, steps: int, bands: Optional[int]) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "bands", bands)
        object.__setattr__(self, "_cache", {})

    # --- sensitivity and accounting -------------------------------------------------------
    def _check(self, participation: Participation) -> None:
        """Refuse a participation schema the theory does not cover for this strategy."""
        if participation.kind == "cyclic_poisson":
            if self.kind == "tree":
                raise ValueError(
                    "participation 'cyclic_poisson' (amplified BandMF) needs a banded strategy with "
                    "bands <= min_separation (arXiv 2306.08153, Thm. 4); the tree is not banded")
            b = participation.min_separation
            if self.bands > b:
                raise ValueError(
                    f"participation 'cyclic_poisson' needs bands <= min_separation (arXiv 2306.08153, "
                    f"Thm. 4: the columns of one part's steps must be orthogonal); got bands="
                    f"{self.bands} > min_separation={b}")
            if b > self.steps:
                raise ValueError(
                    f"participation 'cyclic_poisson' needs min_separation <= steps (each of the b "
                    f"parts takes part at least once); got min_separation={b} > steps={self.steps}")
        if participation.kind == "shuffled" and self.kind != "tree" \
                and min(participation.steps_per_epoch, self.steps) < self.bands - 1:
            raise ValueError(
                f"participation 'shuffled' needs steps_per_epoch >= bands - 1 for a banded strategy "
                f"(then only neighbouring epochs' steps can share a band); got steps_per_epoch="
                f"{participation.steps_per_epoch} < bands - 1 = {self.bands - 1}")
        if participation.kind == "min_separated" and self.kind != "tree" \
                and self.bands > participation.min_separation:
            raise ValueError(
                f"participation 'min_separated' needs bands <= min_separation for a banded strategy "
                f"(arXiv 2306.08153, Thm. 2: the exact sensitivity); got bands={self.bands} > "
                f"min_separation={participation.min_separation}; optimise the strategy for at most "
                f"{participation.min_separation} bands")

    def _prefix(self, participation: Participation) -> np.ndarray:
        participation = _participation(participation)
        self._check(participation)
        key = ("S", participation)
        S = self._cache.get(key)
        if S is None:
            S = self._compute_prefix(participation)
            S.setflags(write=False)
            self._cache[key] = S
        return S

    def sensitivity_sq_prefix(self, t: int, participation: Participation) -> float:
        """S_t: the max over ``participation``'s patterns of the squared L2 sensitivity (per unit
        clipping norm, add/remove adjacency) of the rows of C released by the end of step t
        (0-based; t = -1 gives 0). Exact where C^T C >= 0 on the pattern's entries or the
        pattern's columns are orthogonal: identity; the tree under "single"/"every_epoch"; banded
        C under "single", "min_separated" (separation >= bands) and "every_epoch" with
        steps_per_epoch >= bands; banded C with C^T C >= 0 (e.g. optimised BandMF) under
        "shuffled". Otherwise an upper bound: banded C under "every_epoch" with steps_per_epoch <
        bands or under "shuffled", the conservative sum_{i, j in pattern} |(C^T C)_{ij}|
        (arXiv 2211.06530, Eq. 5); the tree under "min_separated" or "shuffled", a packing bound
        (mf_sensitivity.tree_min_separated, tree_shuffled). For "cyclic_poisson" the value without
        amplification (every step of the record's part). Non-decreasing in t."""
        t = _step("t", t, self.steps, low=-1)
        S = self._prefix(participation)
        return 0.0 if t < 0 else float(S[t])

    def step_event(self, t: int, noise_multiplier: float, participation: Participation) -> Optional[Event]:
        """The accounting event to compose after step t (None: nothing new to account for).

        Non-amplified schemas: GaussianEvent(sigma / sqrt(S_t - S_{t-1})), so that the events of
        steps 0..t compose (1 / sigma^2 adds, under RDP and PLD) to exactly the Gaussian
        mechanism with noise sigma and sensitivity sqrt(S_t), which is the release of rows 0..t.

        "cyclic_poisson" (amplified BandMF, arXiv 2306.08153, Thm. 4; jax_privacy
        ``accounting.amplified_bandmf_event``): with b = min_separation parts (b <= T), a C with
        at most b bands (so the columns of one part's steps are orthogonal), max column norm zeta
        and noise sigma, the mechanism is as private as ceil(T / b) rounds of DP-SGD:
        PoissonSampledEvent(q, GaussianEvent(sigma / zeta)) each. One such event at each step t
        with t % b == 0 (the start of a round: after step t at most floor(t / b) + 1 rounds of
        any part have begun), else None.

        Args:
            t: the step (0-based, < steps).
            noise_multiplier: sigma, the std of z as a multiple of the clipping norm.
            participation: the schema the data loading actually follows.
        """
        t = _step("t", t, self.steps)
        sigma = _checks.positive("noise_multiplier", noise_multiplier)
        participation = _participation(participation)
        self._check(participation)
        if participation.kind == "cyclic_poisson":
            if t % participation.min_separation:
                return None
            return PoissonSampledEvent(participation.sample_rate, GaussianEvent(sigma / self.max_column_norm()))
        S = self._prefix(participation)
        inc = float(S[t] - (S[t - 1] if t else 0.0))
        if inc <= 0.0:
            return None
        # an increment below (sigma / 1e100)^2 (GaussianEvent's range) is rounded up: conservative
        return GaussianEvent(min(sigma / math.sqrt(inc), 1e100))

    def event(self, noise_multiplier: float, participation: Participation,
              steps: Optional[int] = None) -> Event:
        """The composition of ``step_event`` over steps 0..steps-1 (default: all T) as one
        event, for calibration: GaussianEvent(sigma / sqrt(S_{steps-1})), or for
        "cyclic_poisson" ceil(steps / b) Poisson-sampled Gaussian rounds."""
        n = self.steps if steps is None else _step("steps", steps, self.steps + 1, low=1)
        sigma = _checks.positive("noise_multiplier", noise_multiplier)
        participation = _participation(participation)
        self._check(participation)
        if participation.kind == "cyclic_poisson":
            rounds = -(-n // participation.min_separation)
            inner = PoissonSampledEvent(participation.sample_rate, GaussianEvent(sigma / self.max_column_norm()))
            return SelfComposedEvent(inner, rounds)
        S = float(self._prefix(participation)[n - 1])
        return GaussianEvent(sigma / math.sqrt(S))

    def max_column_norm(self) -> float:
        """zeta: the largest L2 norm of a column of C (all rows released)."""
        raise NotImplementedError

    def expected_error(self) -> float:
        """||B||_F^2 = ||A C^{-1}||_F^2: the total squared error of the T noisy prefix sums per unit
        noise variance (multiply by sigma^2 Clip^2). Compare strategies by
        ``expected_error() * sensitivity_sq_prefix(T - 1, participation)``, the error at equal
        privacy (``loss``)."""
        raise NotImplementedError

    def loss(self, participation: Participation) -> float:
        """expected_error() x S_{T-1}: the total squared prefix-sum error at unit privacy
        (noise scaled to the sensitivity), arXiv 2306.08153 Sec. 3; lower is better."""
        return self.expected_error() * self.sensitivity_sq_prefix(self.steps - 1, participation)

    def _compute_prefix(self, participation: Participation) -> np.ndarray:
        raise NotImplementedError

    def matrix(self) -> np.ndarray:
        """C as a dense float64 array (tests, small T only)."""
        raise NotImplementedError

    def noise_matrix(self) -> np.ndarray:
        """M with w = M z: the gradient-space noise of all T steps from the fresh Gaussians z
        (one per row of C); its covariance per coordinate is sigma^2 M M^T (small T only)."""
        raise NotImplementedError

    def _dense_ok(self) -> None:
        if self.steps > _MAX_DENSE:
            raise ValueError(f"dense matrices are for steps <= {_MAX_DENSE}; this strategy has {self.steps}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, steps={self.steps}, bands={self.bands})"


class BandedStrategy(NoiseStrategy):
    """A b-banded lower-triangular C = L diag(column_scale), L Toeplitz with ``coefficients``
    (C[t, t - m] = coefficients[m] * column_scale[t - m], m < b). kind "identity" is b = 1 with
    coefficient 1."""

    def __init__(self, kind: str, coefficients: np.ndarray, steps: int,
                 column_scale: Optional[np.ndarray] = None) -> None:
        c = np.array(coefficients, dtype=np.float64).reshape(-1)
        c.setflags(write=False)
        scale = np.ones(steps) if column_scale is None else np.array(column_scale, dtype=np.float64)
        scale.setflags(write=False)
        self._init(kind, steps, int(c.size))
        object.__setattr__(self, "coefficients", c)
        object.__setattr__(self, "column_scale", scale)
        band = np.zeros((steps, c.size))
        for m in range(c.size):
            band[m:, m] = c[m] * scale[: steps - m]
        band.setflags(write=False)
        object.__setattr__(self, "_band", band)

    def row(self, t: int) -> np.ndarray:
        """Row t of C on its band: [C[t, t], C[t, t-1], ..., C[t, t-k]], k = min(bands, t+1) - 1.
        The noise generator computes w_t = (z_t - sum_{j>=1} C[t, t-j] w_{t-j}) / C[t, t]."""
        t = _step("t", t, self.steps)
        return self._band[t, : min(self.bands, t + 1)].copy()

    def _compute_prefix(self, participation: Participation) -> np.ndarray:
        R = np.asarray(self._band)
        if participation.kind == "shuffled":
            return mf_sensitivity.banded_shuffled(R, min(participation.steps_per_epoch, self.steps))
        if participation.kind == "min_separated":
            k = participation.participations(self.steps)
            return mf_sensitivity.banded_min_separated(R, participation.min_separation, k)
        return mf_sensitivity.banded_periodic(R, participation.period(self.steps))

    def max_column_norm(self) -> float:
        if "zeta" not in self._cache:
            self._cache["zeta"] = float(np.sqrt(mf_sensitivity.banded_column_norms_sq(np.asarray(self._band)).max()))
        return self._cache["zeta"]

    def inverse_coefficients(self) -> np.ndarray:
        """g, the Toeplitz coefficients of L^{-1} (length T): L^{-1}[i, j] = g[i - j]."""
        from scipy.signal import lfilter
        e0 = np.zeros(self.steps)
        e0[0] = 1.0
        return lfilter([1.0], self.coefficients, e0)

    def expected_error(self) -> float:
        if "error" in self._cache:
            return self._cache["error"]
        T = self.steps
        g = self.inverse_coefficients()
        Bc = np.cumsum(g)  # B = A L^{-1} is Toeplitz with first column cumsum(g)
        per_row = np.cumsum(Bc * Bc)  # ||row t of B||^2
        scaled = np.nonzero(self.column_scale != 1.0)[0]
        if scaled.size == 0:
            err = float(per_row.sum())
        else:
            # C^{-1} = diag(1 / s) L^{-1}: rows i >= t0 of L^{-1} scaled; rows of B before t0 unchanged
            t0 = int(scaled[0])
            err = float(per_row[:t0].sum())
            v = np.zeros(T)
            v[:t0] = Bc[t0 - 1::-1] if t0 > 0 else 0.0  # row t0 - 1 of B
            for i in range(t0, T):
                v[: i + 1] += g[i::-1] / self.column_scale[i]
                err += float(v[: i + 1] @ v[: i + 1])
        self._cache["error"] = err
        return err

    def matrix(self) -> np.ndarray:
        self._dense_ok()
        T = self.steps
        C = np.zeros((T, T))
        for m in range(self.bands):
            idx = np.arange(m, T)
            C[idx, idx - m] = self._band[m:, m]
        return C

    def noise_matrix(self) -> np.ndarray:
        from scipy.linalg import solve_triangular
        return solve_triangular(self.matrix(), np.eye(self.steps), lower=True)


class TreeStrategy(NoiseStrategy):
    """Binary-tree aggregation over all T steps (Kairouz et al. 2021, DP-FTRL, arXiv 2103.00039,
    Sec. 3, the tree of Dwork et al. 2010 / Chan et al. 2011; no restarts): one fresh Gaussian per
    dyadic node [m 2^h, (m + 1) 2^h) inside [0, T), released once its last step is done; the
    noisy prefix sum of steps 0..t adds the noises of the nodes of t + 1's binary decomposition.
    Node ids: level h's nodes after all lower levels' (0 <= id < 2T)."""

    def __init__(self, steps: int) -> None:
        self._init("tree", steps, None)
        offsets, s, n = [], 1, 0
        while s <= steps:
            offsets.append(n)
            n += steps // s
            s *= 2
        object.__setattr__(self, "_offsets", tuple(offsets))
        object.__setattr__(self, "num_nodes", n)

    def node_id(self, level: int, index: int) -> int:
        """The id of node [index 2^level, (index + 1) 2^level)."""
        return self._offsets[level] + index

    def prefix_nodes(self, t: int) -> list[int]:
        """The ids of the nodes whose noises sum to the prefix noise of steps 0..t (t = -1: [])."""
        t = _step("t", t, self.steps, low=-1)
        n, pos, out = t + 1, 0, []
        for h in range(n.bit_length() - 1, -1, -1):
            if n >> h & 1:
                out.append(self.node_id(h, pos >> h))
                pos += 1 << h
        return out

    def _compute_prefix(self, participation: Participation) -> np.ndarray:
        if participation.kind == "shuffled":
            return mf_sensitivity.tree_shuffled(self.steps, min(participation.steps_per_epoch, self.steps))
        if participation.kind == "min_separated":
            k = participation.participations(self.steps)
            return mf_sensitivity.tree_min_separated(self.steps, participation.min_separation, k)
        return mf_sensitivity.tree_periodic(self.steps, participation.period(self.steps))

    def max_column_norm(self) -> float:
        return math.sqrt(len(self._offsets))  # step 0 is in one node per level

    def expected_error(self) -> float:
        return float(sum(bin(t + 1).count("1") for t in range(self.steps)))

    def matrix(self) -> np.ndarray:
        """C: one row per node id (num_nodes x T), 1 on the node's steps."""
        self._dense_ok()
        C = np.zeros((self.num_nodes, self.steps))
        for h, off in enumerate(self._offsets):
            s = 1 << h
            for m in range(self.steps // s):
                C[off + m, m * s:(m + 1) * s] = 1.0
        return C

    def release_step(self) -> np.ndarray:
        """For each node id, the step after which it is released (its last step)."""
        out = np.empty(self.num_nodes, dtype=np.int64)
        for h, off in enumerate(self._offsets):
            s = 1 << h
            m = np.arange(self.steps // s)
            out[off + m] = (m + 1) * s - 1
        return out

    def noise_matrix(self) -> np.ndarray:
        """M (T x num_nodes): w_t = sum(prefix_nodes(t)) - sum(prefix_nodes(t - 1))."""
        self._dense_ok()
        P = np.zeros((self.steps + 1, self.num_nodes))
        for t in range(self.steps):
            P[t + 1, self.prefix_nodes(t)] = 1.0
        return np.diff(P, axis=0)
