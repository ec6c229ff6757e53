"""Data-level and prediction-level DP mechanisms: Gaussian, Laplace, randomized response and
report-noisy-max. Record first, release second (DESIGN.md invariant 4): pass a
:class:`~ppml_fast.accounting.ledger.PrivacyLedger` and the data set, and the spend is durably
recorded (and checked against the budget) before any noise is drawn::

    ledger = PrivacyLedger("privacy.ledger")
    ledger.add_dataset("survey", epsilon_budget=3.0, delta=1e-6)
    mean, event = gaussian_mechanism(x.mean(0), sensitivity=1 / n, noise_multiplier=2.0,
                                     ledger=ledger, dataset="survey")

Each mechanism also returns the event it spent. Composing it into an accountant afterwards
(``accountant.compose(event)``) records it only after the value exists: a crash in between
releases a value nobody counted, so use ``ledger=`` wherever the release leaves the process.

All noise comes from the native noise op (``ppml_fast.ops.add_gaussian_noise_``): Philox keyed
by a seed (reproducible), or ChaCha20 keyed from OS entropy with ``secure=True``. Inputs are
never modified; a tensor in gives a tensor out, a numpy array a numpy array, a float a float.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ppml_fast.accounting import _checks
from ppml_fast.accounting.analytic_gaussian import analytic_gaussian_sigma
from ppml_fast.accounting.events import Event, GaussianEvent, LaplaceEvent, RandomizedResponseEvent
from ppml_fast.accounting.ledger import PrivacyLedger
from ppml_fast.laplace_sampling import unbounded_exponential, unbounded_laplace
from ppml_fast.noise_keys import NoiseStream
from ppml_fast.ops import add_gaussian_noise_
from ppml_fast.ops._native import noise_blocks

Value = Union[torch.Tensor, np.ndarray, float]


class NoiseSource:
    """Standard normals from the native op, never the same numbers twice: not across calls,
    threads sharing the source (offsets are reserved atomically) or forked processes (the key is
    re-keyed in a forked child; :mod:`ppml_fast.noise_keys`).

    Args:
        seed: Philox key in [0, 2**64), for reproducible noise (then
            ``noise_keys.REPRODUCIBLE_NOISE``: no privacy against whoever knows the seed);
            None draws the key from ``os.urandom``.
        secure: ChaCha20 keyed from OS entropy on every call, and the sum-of-four-normals
            sampler (Holohan & Braghin 2021, Sec. 5) against floating-point attacks on the
            Gaussian; a ``seed`` with ``secure=True`` is an error.
    """

    def __init__(self, seed: Optional[int] = None, *, secure: bool = False) -> None:
        if not isinstance(secure, bool):
            raise TypeError(f"secure must be a bool; got {type(secure).__name__}")
        self.secure = secure
        self.stream = NoiseStream(seed, name="seed", secure=secure)

    @property
    def seed(self) -> int:
        """The Philox key (unused in secure mode)."""
        return self.stream.seed

    @property
    def offset(self) -> int:
        """The next unreserved Philox block."""
        return self.stream.offset

    @property
    def reproducible(self) -> bool:
        """True when the noise was keyed from a user-given seed."""
        return self.stream.reproducible

    def normal(self, shape: Tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A fresh tensor of N(0, 1) samples; reserves the offsets it consumes first."""
        out = torch.zeros(shape, dtype=dtype)
        if out.numel():
            key, start = self.stream.reserve(noise_blocks(out.numel()))
            add_gaussian_noise_(out, 1.0, seed=key, offset=start, secure=self.secure)
        return out

    def uniform(self, shape: Tuple[int, ...]) -> torch.Tensor:
        """Uniform(0, 1) samples as Phi(Z) of standard normals, in float64. (The normals'
        radius bound of 8.57 moves at most 2^-53 of probability mass.)"""
        return torch.special.ndtr(self.normal(shape))

    def exponential(self, shape: Tuple[int, ...]) -> torch.Tensor:
        """Exp(1) samples without an upper bound (see :func:`ppml_fast.laplace_sampling`)."""
        return unbounded_exponential(self.normal, shape)


def _as_tensor(name: str, value: Value) -> Tuple[torch.Tensor, str]:
    if isinstance(value, torch.Tensor):
        kind = "tensor"
        t = value
    elif isinstance(value, np.ndarray):
        kind, t = "numpy", torch.from_numpy(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        kind, t = "float", torch.tensor(float(value), dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a tensor, numpy array or real number; got {type(value).__name__}")
    if not (t.dtype.is_floating_point):
        raise TypeError(f"{name} must hold floating-point values; got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU; got {t.device}")
    if not bool(torch.isfinite(t).all()):
        # a NaN or inf would pass through the noise and reveal where it was
        raise ValueError(f"{name} must be finite; got NaN or inf")
    return t, kind


def _back(t: torch.Tensor, kind: str) -> Value:
    if kind == "numpy":
        return t.numpy()
    if kind == "float":
        return float(t)
    return t


def _rng(rng: Optional[NoiseSource]) -> NoiseSource:
    if rng is None:
        return NoiseSource(secure=True)
    if not isinstance(rng, NoiseSource):
        raise TypeError(f"rng must be a NoiseSource or None; got {type(rng).__name__}")
    return rng


def _one_of(names: Tuple[str, str], values: Tuple[object, object]) -> None:
    if (values[0] is None) == (values[1] is None):
        raise ValueError(f"pass exactly one of {names[0]} and {names[1]}")


def _record(ledger: Optional[PrivacyLedger], dataset: Optional[str], what: Optional[str],
            event: Event, default_what: str) -> None:
    """Spends ``event`` on ``ledger`` (durably, budget-checked) before the caller draws noise."""
    if ledger is None:
        if dataset is not None or what is not None:
            raise ValueError("dataset and what describe a ledger spend; pass ledger= too")
        return
    if not isinstance(ledger, PrivacyLedger):
        raise TypeError(f"ledger must be a PrivacyLedger or None; got {type(ledger).__name__}")
    if dataset is None:
        raise ValueError("ledger= needs dataset=, the name of the data set the release spends on")
    ledger.spend(dataset, event, what=default_what if what is None else what)


def gaussian_mechanism(
    value: Value,
    *,
    sensitivity: float,
    noise_multiplier: Optional[float] = None,
    epsilon: Optional[float] = None,
    delta: Optional[float] = None,
    rng: Optional[NoiseSource] = None,
    ledger: Optional[PrivacyLedger] = None,
    dataset: Optional[str] = None,
    what: Optional[str] = None,
) -> Tuple[Value, Event]:
    """``value + N(0, (noise_multiplier * sensitivity)^2)`` element-wise.

    Args:
        sensitivity: L2 sensitivity of ``value`` (over all its elements) to one record.
        noise_multiplier: noise std as a multiple of the sensitivity; or instead
        epsilon, delta: the smallest noise for one (epsilon, delta)-DP release, by the analytic
            Gaussian mechanism (Balle & Wang 2018, Thm. 8).
        rng: where the noise comes from (default: a fresh secure source).
        ledger, dataset, what: record the release's event in ``ledger`` under ``dataset``
            (described by ``what``; default the mechanism's name) before any noise is drawn:
            durably first, released second; PrivacyBudgetExceeded (nothing drawn) when it
            would pass the data set's budget. The documented way to release.

    Returns:
        (noisy value, ``GaussianEvent(noise_multiplier)``).
    """
    t, kind = _as_tensor("value", value)
    sensitivity = _checks.positive("sensitivity", sensitivity)
    _one_of(("noise_multiplier", "epsilon"), (noise_multiplier, epsilon))
    if epsilon is not None:
        if delta is None:
            raise ValueError("delta is required with epsilon")
        noise_multiplier = analytic_gaussian_sigma(epsilon, delta, 1.0)
    elif delta is not None:
        raise ValueError("delta is only used with epsilon; got delta without epsilon")
    event = GaussianEvent(noise_multiplier)
    source = _rng(rng)
    _record(ledger, dataset, what, event, "gaussian_mechanism")
    noise = source.normal(tuple(t.shape))
    out = (t.double() + noise * (event.noise_multiplier * sensitivity)).to(t.dtype)
    return _back(out, kind), event


def laplace_mechanism(
    value: Value,
    *,
    sensitivity: float,
    scale: Optional[float] = None,
    epsilon: Optional[float] = None,
    rng: Optional[NoiseSource] = None,
    ledger: Optional[PrivacyLedger] = None,
    dataset: Optional[str] = None,
    what: Optional[str] = None,
) -> Tuple[Value, Event]:
    """``value + Laplace(0, scale * sensitivity)`` element-wise: pure (1/scale)-DP.

    Args:
        sensitivity: L1 sensitivity of ``value`` (over all its elements) to one record.
        scale: noise scale as a multiple of the sensitivity; or ``epsilon`` (scale = 1/epsilon).
        ledger, dataset, what: record the release's event in ``ledger`` under ``dataset``
            (described by ``what``; default the mechanism's name) before any noise is drawn:
            durably first, released second; PrivacyBudgetExceeded (nothing drawn) when it
            would pass the data set's budget. The documented way to release.

    Returns:
        (noisy value, ``LaplaceEvent(scale)``).

    Laplace(0, 1) is the difference of two Exp(1) samples drawn without an upper bound
    (:mod:`ppml_fast.laplace_sampling`: inversion -ln Φ(Z) of standard normals, redrawing the
    tail above 20 by memorylessness), so the noise has the full Laplace tail that pure ε-DP
    needs (the former sampler stopped at 73.4 scale units). ``secure`` sources draw the normals
    from ChaCha20; the floating-point defence of Holohan & Braghin is proven for their Gaussian
    sampler, not for this construction: do not treat secure Laplace as hardened against
    floating-point attacks.
    """
    t, kind = _as_tensor("value", value)
    sensitivity = _checks.positive("sensitivity", sensitivity)
    _one_of(("scale", "epsilon"), (scale, epsilon))
    if epsilon is not None:
        scale = 1.0 / _checks.positive("epsilon", epsilon)
    event = LaplaceEvent(scale)
    source = _rng(rng)
    _record(ledger, dataset, what, event, "laplace_mechanism")
    lap = unbounded_laplace(source.normal, tuple(t.shape))
    out = (t.double() + lap * (event.scale * sensitivity)).to(t.dtype)
    return _back(out, kind), event


def randomized_response(
    values: Union[torch.Tensor, np.ndarray],
    *,
    num_buckets: int,
    epsilon: Optional[float] = None,
    noise_parameter: Optional[float] = None,
    rng: Optional[NoiseSource] = None,
    ledger: Optional[PrivacyLedger] = None,
    dataset: Optional[str] = None,
    what: Optional[str] = None,
) -> Tuple[Union[torch.Tensor, np.ndarray], Event]:
    """k-ary randomized response on integer ``values`` in [0, num_buckets): each is replaced,
    with probability ``noise_parameter``, by a uniformly random bucket (Warner 1965).

    Pass ``epsilon`` (local DP: any two inputs' output distributions within e^epsilon) or
    ``noise_parameter``. Returns (responses with the input's type and dtype,
    ``RandomizedResponseEvent``) — the event of one respondent's value. ``ledger``, ``dataset``,
    ``what``: as in :func:`gaussian_mechanism` (recorded before any randomness is drawn).
    """
    if isinstance(values, np.ndarray):
        t, kind = torch.from_numpy(values), "numpy"
    elif isinstance(values, torch.Tensor):
        t, kind = values, "tensor"
    else:
        raise TypeError(f"values must be a tensor or numpy array; got {type(values).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"values must hold integers; got {t.dtype}")
    _one_of(("epsilon", "noise_parameter"), (epsilon, noise_parameter))
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, numbers.Integral):
        raise TypeError(f"num_buckets must be an int; got {type(num_buckets).__name__}")
    event = (RandomizedResponseEvent.from_epsilon(epsilon, num_buckets) if epsilon is not None
             else RandomizedResponseEvent(noise_parameter, num_buckets))
    if num_buckets - 1 > torch.iinfo(t.dtype).max:
        raise ValueError(f"num_buckets={num_buckets} does not fit values of dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_buckets):
        raise ValueError(f"values must be in [0, num_buckets={num_buckets}); got range "
                         f"[{int(t.min())}, {int(t.max())}]")
    source = _rng(rng)
    _record(ledger, dataset, what, event, "randomized_response")
    u = source.uniform((2,) + tuple(t.shape))
    random_bucket = torch.clamp((u[1] * num_buckets).long(), max=num_buckets - 1)
    out = torch.where(u[0] < event.noise_parameter, random_bucket, t.long()).to(t.dtype)
    return (out.numpy() if kind == "numpy" else out), event


def report_noisy_max(
    scores: Union[torch.Tensor, np.ndarray],
    *,
    sensitivity: float,
    noise_multiplier: Optional[float] = None,
    laplace_scale: Optional[float] = None,
    rng: Optional[NoiseSource] = None,
    ledger: Optional[PrivacyLedger] = None,
    dataset: Optional[str] = None,
    what: Optional[str] = None,
) -> Tuple[Union[torch.Tensor, np.ndarray], Event]:
    """The index of the largest noisy score along the last dimension (e.g. a label from
    per-class vote counts; rows of a 2-D ``scores`` are separate queries).

    Gaussian noise (``noise_multiplier``; ``sensitivity`` = the L2 sensitivity of all of
    ``scores`` to one record) is PATE's GNMax (Papernot et al. 2018, Sec. 4.1); Laplace noise
    (``laplace_scale``; ``sensitivity`` in L1) is the classic report-noisy-max. Accounted
    conservatively, as the release of every noisy score (the argmax is post-processing of it):
    returns (indices as int64, ``GaussianEvent`` or ``LaplaceEvent``). Data-dependent analyses
    can be tighter; this bound never depends on the data. ``ledger``, ``dataset``, ``what``: as
    in :func:`gaussian_mechanism`.
    """
    t, kind = _as_tensor("scores", scores)
    if t.dim() == 0 or t.shape[-1] == 0:
        raise ValueError(f"scores must have a non-empty last dimension; got shape {tuple(t.shape)}")
    _one_of(("noise_multiplier", "laplace_scale"), (noise_multiplier, laplace_scale))
    spend = dict(rng=rng, ledger=ledger, dataset=dataset,
                 what="report_noisy_max" if ledger is not None and what is None else what)
    if noise_multiplier is not None:
        noisy, event = gaussian_mechanism(t, sensitivity=sensitivity, noise_multiplier=noise_multiplier, **spend)
    else:
        noisy, event = laplace_mechanism(t, sensitivity=sensitivity, scale=laplace_scale, **spend)
    idx = noisy.double().argmax(dim=-1)
    return (idx.numpy() if kind == "numpy" else idx), event


__all__ = [
    "NoiseSource",
    "gaussian_mechanism",
    "laplace_mechanism",
    "randomized_response",
    "report_noisy_max",
]
