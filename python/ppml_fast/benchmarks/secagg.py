"""Benchmark cases of secure aggregation (issue 7): the cost of one round for K = 100 clients
with P = 10^6 parameters each, against the plain aggregation of the same updates
(``weighted_aggregate``, the floor: ratios are secure ms / plain ms, the overhead factor).

- ``secagg-round``: the whole protocol in one process (:class:`SecAggRound`), all 100 clients
  and the server, complete graph (Bonawitz et al. 2017: every client expands 100 masks of 10^6
  words, so the round expands 10^10 ChaCha20 words);
- ``secagg-plus-round``: the same with SecAgg+'s random 20-regular graph (Bell et al. 2020:
  21 masks per client);
- ``secagg-masking``: the masking and unmasking alone, the part the issue asks about: every
  client's encoding and mask expansion (native ``secagg_mask_``) and the server's ring sum and
  self-mask removal, with the key agreement, the pair seeds and the Shamir shares prepared
  beforehand (complete graph);
each against ``plain``: ``weighted_aggregate`` of the (K, P) float32 matrix with unit weights.
A round is serial CPU work for the whole population; on real devices the clients' part runs in
parallel, so a client's own cost is about (round - server) / K.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ppml_fast.benchmarks.cases import Case, Impl, Inputs

SIZES = {"full": (100, 1_000_000), "tiny": (4, 1_000)}
NEIGHBOURS = 20
CLIP_RANGE = 0.1


def _setup(k: int, p: int):
    def setup() -> Inputs:
        gen = torch.Generator().manual_seed(0)
        updates = torch.randn(k, p, generator=gen) * 0.01
        return {"updates": updates, "k": k, "p": p}

    return setup


def _plain(x: Inputs):
    from ppml_fast.ops import weighted_aggregate

    updates, ones = x["updates"], torch.ones(x["k"], dtype=torch.float64)
    return lambda: weighted_aggregate(updates, ones)


def _round(neighbours):
    def make(x: Inputs):
        from ppml_fast.federated.secagg import SecAggParams, SecAggRound

        k, p, rows = x["k"], x["p"], list(x["updates"])
        nb = neighbours if neighbours is None or neighbours < k - 1 else None

        def run():
            params = SecAggParams.create(list(range(k)), vector_length=p, clip_range=CLIP_RANGE,
                                         neighbours=nb)
            return SecAggRound(params).run(rows)

        return run

    return make


def _masking(x: Inputs):
    """Rounds 2 and 4 without the protocol's bookkeeping: the same calls the client and the
    server make (encode, expand the masks, ring sum, remove the self masks, decode)."""
    from ppml_fast.federated.secagg import Quantizer, max_bits
    from ppml_fast.ops import secagg_mask_

    k, p, rows = x["k"], x["p"], list(x["updates"])
    q = Quantizer(CLIP_RANGE, max_bits(k))
    rng = np.random.default_rng(0)
    pair = rng.integers(0, 256, (k, k, 32), dtype=np.uint8)  # the pair seeds s_uv (u < v used)
    self_seeds = torch.from_numpy(rng.integers(0, 256, (k, 32), dtype=np.uint8))
    client_seeds, client_signs = [], []
    for u in range(k):
        seeds = [self_seeds[u].numpy()] + [pair[min(u, v), max(u, v)] for v in range(k) if v != u]
        signs = [1] + [1 if u < v else -1 for v in range(k) if v != u]
        client_seeds.append(torch.from_numpy(np.stack(seeds)))
        client_signs.append(torch.tensor(signs, dtype=torch.int8))
    minus = torch.full((k,), -1, dtype=torch.int8)

    def run():
        total = np.zeros(p + 1, dtype=np.uint32)
        for u in range(k):
            y = torch.empty(p + 1, dtype=torch.int32)
            y[:-1] = q.quantize(rows[u], seed=os.urandom(32))
            y[-1] = 1
            secagg_mask_(y, client_seeds[u], client_signs[u])
            total += y.numpy().view(np.uint32)
        z = torch.from_numpy(total).view(torch.int32)
        secagg_mask_(z, self_seeds, minus)
        return q.dequantize(z[:-1], k)

    return run


def secagg_cases(sizes: str = "full") -> list[Case]:
    """The secure-aggregation cases (``"tiny"``: 4 clients x 1,000 parameters, for tests)."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(map(repr, SIZES))}; got {sizes!r}")
    k, p = SIZES[sizes]
    setup = _setup(k, p)
    shape = f"{k} clients x {p:,} parameters"
    plain = Impl("plain", "weighted_aggregate (no secure aggregation)", _plain, role="floor")
    return [
        Case("secagg-masking", f"SecAgg masking + unmasking per round, {shape}", setup, (
            Impl("secagg_masking", f"encode + mask ({k} seeds each) + sum + unmask",
                 _masking, role="ppml_fast"),
            plain,
        )),
        Case("secagg-plus-round", f"SecAgg+ round ({NEIGHBOURS} neighbours), {shape}", setup, (
            Impl("secagg_plus", f"SecAggRound, {NEIGHBOURS}-regular graph", _round(NEIGHBOURS),
                 role="ppml_fast"),
            plain,
        )),
        Case("secagg-round", f"SecAgg round (complete graph), {shape}", setup, (
            Impl("secagg", "SecAggRound, complete graph", _round(None), role="ppml_fast"),
            plain,
        )),
    ]
