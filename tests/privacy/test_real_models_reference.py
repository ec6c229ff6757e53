"""Issue 16's correctness target on the benchmark's own models: for every model of
``ppml-fast bench --only models`` (:mod:`ppml_fast.benchmarks.model_zoo`, at its "test" sizes:
hidden 16, 2 layers, 6 tokens, 4 records; ResNet-18-GN at width 4 on 16x16 images), ppml_fast's
clipped sum of per-sample gradients (one ``make_private`` step, noise 0, ghost mode) equals a
float64 per-record reference within 1e-5 relative.

The reference (tests/privacy/sensitivity/_harness.py) is the definition: a float64 copy of the
very weights the engine sees, one backward per record on a batch of that record alone, each
record's gradient clipped with min(1, C / (||g_i|| + 1e-6)) (Abadi et al. 2016, Alg. 1) and
summed. C is the median of the records' gradient norms, so that some records are clipped and
some are not (a wrong factor on either side shows). The error is normwise over all trainable
parameters, relative to ||reference sum|| and, as the sensitivity suite measures it, to
sum_i ||clipped g_i||; both must be <= 1e-5.

float64: the engine computes in the model's dtype; measured 1e-16 to 5e-15 here, and held to
the sensitivity suite's float64 tolerance (``rtol(float64)`` = 1e-9), far inside 1e-5: a float32
intermediate on a float64 path fails it. float32: the same models in float32 against the same
float64 reference, held to 1e-5 (measured 8e-8 to 2.4e-6, the most on ResNet-18-GN, whose last
GroupNorms normalise 2 values per group at 1x1).

A model ppml_fast refuses is listed in ``REFUSED``: a strict xfail with the reason (it must raise
UnsupportedModuleError; it flips when support lands). None is refused now: nn.LSTM and nn.GRU
came with 8c98062.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ppml_fast.benchmarks.model_zoo import MODELS, SIZES, forward_loss, make_batch
from ppml_fast.privacy.layers import UnsupportedModuleError
from tests.privacy.sensitivity._harness import (
    Case, cast, clip_and_sum, engine_sums, lowered, per_record_grads, rtol)

TOL = 1e-5
SIZE = SIZES["test"]
# model -> why ppml_fast refuses it (a strict xfail: an unexpected pass fails, so the entry goes
# when support lands). Empty since 8c98062 (nn.LSTM / nn.GRU, issue 16 item 3).
REFUSED: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    yield
    torch.set_num_threads(before)


def _params():
    out = []
    for k in MODELS:
        marks = ()
        if k in REFUSED:
            marks = pytest.mark.xfail(strict=True, raises=UnsupportedModuleError, reason=REFUSED[k])
        out.append(pytest.param(k, marks=marks, id=k))
    return out


def _errors(key: str, dtype: torch.dtype) -> tuple[float, float, str]:
    spec = MODELS[key]
    model64 = spec.build(SIZE).double()
    inputs, target = make_batch(spec, SIZE, seed=1)
    case = Case(name=key, build=lambda: model64, inputs=inputs, target=target,
                forward_loss=forward_loss, dtype=dtype, mode="ghost")
    model = lowered(case, model64)  # the engine's copy, in dtype
    ref_model = copy.deepcopy(model).double()  # exactly the weights the engine sees
    per_record = per_record_grads(case, ref_model, cast(inputs, torch.float64), target)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_record.values()]).sum(0).sqrt()
    case = case.with_(C=float(norms.median()))
    assert bool((norms > case.C).any()) and bool((norms <= case.C).any())  # both sides of C
    want, clipped_norms = clip_and_sum(case, per_record)
    got = engine_sums(case, model, cast(inputs, dtype), target)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    err = math.sqrt(sum(float((got[n] - want[n]).pow(2).sum()) for n in want))
    ref_norm = math.sqrt(sum(float(w.pow(2).sum()) for w in want.values()))
    worst = max(want, key=lambda n: float((got[n] - want[n]).norm()))
    detail = (f"{key} [{dtype}]: ||engine - reference|| = {err:.3e}, ||reference|| = {ref_norm:.3e}, "
              f"sum_i ||clipped g_i|| = {float(clipped_norms.sum()):.3e}, C = {case.C:.4g}, "
              f"worst parameter {worst}")
    return err / ref_norm, err / float(clipped_norms.sum()), detail


@pytest.mark.parametrize("key", _params())
def test_clipped_sum_float64(key):
    rel, rel_terms, detail = _errors(key, torch.float64)
    tol = min(TOL, rtol(torch.float64))
    assert rel <= tol and rel_terms <= tol, detail


@pytest.mark.parametrize("key", _params())
def test_clipped_sum_float32(key):
    rel, rel_terms, detail = _errors(key, torch.float32)
    assert rel <= TOL and rel_terms <= TOL, detail


def test_every_bench_model_is_checked():
    """The bench's model list and this file's cover each other (a new model gets a reference)."""
    assert set(REFUSED) <= set(MODELS)
    assert len(_params()) == len(MODELS) == 10
    assert {"lstm", "gru"} <= set(MODELS)  # the recurrent models stay in both
