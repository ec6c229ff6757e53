"""Choosing a round's neighbour-graph degree k and Shamir threshold t from the expected dropout
rate and a target failure probability (SecAgg+, Bell, Bonawitz, Gascón, Lepoint, Raykova,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 / ePrint 2020/704).

Bell et al. (section 3, the semi-honest protocol over a random k-regular graph, and the
conditions on (k, t) their security and correctness theorems rest on; section 4 repeats them for
the semi-malicious protocol) need, for a graph over n clients with a fraction d of dropouts and
a fraction g of clients colluding with the server:

* correctness: every secret the server must reconstruct has t shares among the clients that
  survive: for a surviving client u, |N(u) ∩ alive| + 1 >= t (its own share counts), for a
  client that dropped after sharing, |N(u) ∩ alive| >= t;
* security: (i) no honest client has t or more corrupt neighbours (they could pool both of its
  secrets with the server), (ii) the graph of honest surviving clients stays connected (else
  the server learns the sum of each component, not only the total), and here also
  (iii) t > (k + 1) / 2, so that two disjoint sets of holders can never both reconstruct
  (Bonawitz et al., CCS 2017, section 4: a server that lies about who dropped gets at most one
  of b_u, s_u; :class:`~.params.SecAggParams` enforces it).

(The conditions are restated in our words; we cite sections, not theorem numbers, which we
could not check against the paper here.)

The probabilities (our derivation, conservative where marked):

* the graph is a Harary graph over a uniformly random relabelling (:mod:`.graph`), drawn
  independently of who drops out; dropouts are independent with probability d each, so the
  number of surviving neighbours of a client is exactly Binomial(k, 1 - d). A client fails
  with probability ``(1 - d) P[B <= t - 2] + d P[B <= t - 1]``, B ~ Bin(k, 1 - d), and the
  round with at most n times that (union bound over the n clients: conservative);
* complete graph (k = n - 1): every client's holders are all n clients, so the round fails
  exactly when fewer than t clients survive: P[Bin(n, 1 - d) < t] (exact, no union bound);
* (i): n P[Bin(k, g) >= t] (union bound; corrupt clients drawn independently with probability
  g — for exactly g n corrupt clients the count is hypergeometric, which Hoeffding (1963,
  section 6) shows is at least as concentrated for the Chernoff bounds);
* (ii), Harary graph only: removing positions from the ring H(k, n) disconnects it only if
  k/2 consecutive positions are all removed (dropped or corrupt, probability d + g each), so
  P <= n (d + g)^(k/2) (union over the n starting positions: conservative).

:func:`design` returns the smallest even k (then the complete graph) whose smallest valid t
meets both targets, with t as small as security allows (t small = more dropouts survived).
When no k meets the correctness target (few clients, many dropouts: 20 clients at d = 0.3 fail
with probability >= 0.048 even at the lowest t > n / 2), it returns the complete graph with that
t and ``meets_target=False``; the round then fails now and then, and the strategy retries or
skips it (:mod:`.strategy`), it never weakens t below the security conditions.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional

from scipy.stats import binom

__all__ = ["SecAggDesign", "design", "round_failure_probability"]


@dataclass(frozen=True)
class SecAggDesign:
    """A round's derived parameters.

    Attributes:
        neighbours: k, an even degree for SecAgg+'s Harary graph, or None for the complete graph.
        threshold: t, the shares needed to reconstruct a secret.
        failure_bound: upper bound on the probability that the round cannot unmask (exact for
            the complete graph).
        security_bound: upper bound on the probability that a security condition fails
            ((i) + (ii) in the module docstring; 0 when g = 0 on the complete graph).
        meets_target: whether ``failure_bound <= failure_probability`` (security is always met).
    """

    neighbours: Optional[int]
    threshold: int
    failure_bound: float
    security_bound: float
    meets_target: bool


def _prob(name: str, v: object, *, hi_open: bool = True, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise TypeError(f"{name} must be a finite real number; got {v!r}")
    x = float(v)
    if x < 0 or x > 1 or (hi_open and x == 1) or (lo_open and x == 0):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}; "
                         f"got {v!r}")
    return x


def round_failure_probability(n: int, neighbours: Optional[int], threshold: int, dropout: float) -> float:
    """Upper bound on P[the round cannot unmask] for n clients, each dropping independently
    with probability ``dropout`` after sharing (module docstring; exact for the complete graph,
    a union bound over the clients for a Harary graph)."""
    if neighbours is None or neighbours >= n - 1:
        return float(binom.cdf(threshold - 1, n, 1 - dropout))
    k, t, d = neighbours, threshold, dropout
    per_client = (1 - d) * binom.cdf(t - 2, k, 1 - d) + d * binom.cdf(t - 1, k, 1 - d)
    return float(min(1.0, n * per_client))


def _security(n: int, k: int, t: int, complete: bool, dropout: float, corrupt: float) -> float:
    corrupt_holders = n * float(binom.sf(t - 1, k, corrupt)) if corrupt > 0 else 0.0  # (i)
    disconnect = 0.0 if complete else n * (dropout + corrupt) ** (k // 2)  # (ii)
    return min(1.0, corrupt_holders + disconnect)


@functools.lru_cache(maxsize=1024)  # one call per round; the arguments repeat
def design(n: int, *, dropout: float, failure_probability: float = 1e-6,
           corrupt_fraction: float = 0.0, security_probability: float = 2.0 ** -40) -> SecAggDesign:
    """(k, t) for a round of ``n`` clients (module docstring).

    Args:
        n: clients in the round (>= 2).
        dropout: d, the probability that a client drops after sharing its keys, in [0, 1).
        failure_probability: the target for P[the round cannot unmask], in (0, 1).
        corrupt_fraction: g, the fraction of clients colluding with the server, in [0, 1).
        security_probability: the target for P[a security condition fails], in (0, 1).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n must be an int >= 2 (clients in the round); got {n!r}")
    d = _prob("dropout", dropout)
    eta = _prob("failure_probability", failure_probability, lo_open=True)
    g = _prob("corrupt_fraction", corrupt_fraction)
    sec = _prob("security_probability", security_probability, lo_open=True)
    n = int(n)
    for k in list(range(2, n - 1, 2)) + [n - 1]:
        complete = k >= n - 1
        holders = k + 1
        t = holders // 2 + 1  # (iii): t > holders / 2
        while t <= holders and _security(n, k, t, complete, d, g) > sec:
            t += 1
        if t > holders:
            continue
        fail = round_failure_probability(n, None if complete else k, t, d)
        security = _security(n, k, t, complete, d, g)
        if fail <= eta or complete:
            return SecAggDesign(None if complete else k, t, fail, security, fail <= eta)
    raise ValueError(f"no threshold keeps the security failure below {sec:g} for n={n}, "
                     f"corrupt_fraction={g:g} (more than half the holders may be corrupt)")
