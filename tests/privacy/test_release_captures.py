"""The DP step releases a layer's captured activation and output gradient as soon as its kept
per-sample gradients hold everything its clipped sum needs (issue 16, peak memory), and keeps
the contract that a step raising NonFiniteGradientError forgets nothing: the retry with
``nonfinite="drop"`` gives the float64 per-record reference."""

import gc
import weakref

import pytest
import torch
from torch import nn

from ppml_fast.privacy import PrivateModule
from ppml_fast.privacy.module import NonFiniteGradientError
from ppml_fast.privacy.per_sample import linear


def _reference(model: nn.Linear, x: torch.Tensor, c: float, keep: list[int]):
    """Sum over the records ``keep`` of min(1, C/||grad_i||) grad_i, in float64 (loss = sum of
    the outputs: the output gradient is all ones)."""
    w = torch.zeros_like(model.weight, dtype=torch.float64)
    b = torch.zeros_like(model.bias, dtype=torch.float64)
    for i in keep:
        xi = x[i].double().reshape(-1, x.shape[-1])
        gw = torch.ones(model.out_features, xi.shape[0], dtype=torch.float64) @ xi
        gb = torch.full((model.out_features,), float(xi.shape[0]), dtype=torch.float64)
        f = min(1.0, c / float(torch.sqrt(gw.square().sum() + gb.square().sum())))
        w += f * gw
        b += f * gb
    return w, b


def test_materialised_capture_released_and_retry_after_raise():
    torch.manual_seed(0)
    d, p, seq = 4, 3, 6
    assert linear.choose_path(3, seq, d, p) == "materialize"  # the path that keeps gradients
    model = nn.Linear(d, p)
    private = PrivateModule(model, loss_reduction="sum")
    x = torch.randn(3, seq, d)
    x[1, 2, 0] = float("inf")
    private(x).sum().backward()
    grad = weakref.ref(private.recorder.batches[0].calls[0].grad)
    gc.collect()
    assert grad() is not None
    with pytest.raises(NonFiniteGradientError, match="samples \\[1\\]"):
        private.clipped_sums(max_grad_norm=2.0)
    gc.collect()
    assert grad() is None  # released while the norms were computed
    assert private.pending_batches() == 1  # nothing forgotten
    sums, seen = private.clipped_sums(max_grad_norm=2.0, nonfinite="drop")
    w, b = _reference(model, x, 2.0, keep=[0, 2])
    assert seen == 3
    torch.testing.assert_close(sums[model.weight].double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums[model.bias].double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nonfinite", ["raise", "drop"])
def test_released_sums_equal_reference(nonfinite):
    torch.manual_seed(1)
    model = nn.Linear(5, 4)
    private = PrivateModule(model, loss_reduction="sum")
    x = torch.randn(4, 7, 5) * 3
    private(x).sum().backward()
    sums, _ = private.clipped_sums(max_grad_norm=1.5, nonfinite=nonfinite)
    w, b = _reference(model, x, 1.5, keep=[0, 1, 2, 3])
    torch.testing.assert_close(sums[model.weight].double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums[model.bias].double(), b, rtol=1e-5, atol=1e-6)


def test_failure_inside_the_norms_refuses_the_retry(monkeypatch):
    """A step that fails after some captures were released never computes on the stand-ins."""
    from ppml_fast.accounting.errors import PrivacyError
    from ppml_fast.privacy import clipping

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    private = PrivateModule(model, loss_reduction="sum")
    private(torch.randn(3, 6, 4)).sum().backward()
    calls = []
    real = clipping._release_capture

    def release_then_fail(c):
        real(c)
        calls.append(c)
        if len(calls) == 2:
            raise RuntimeError("boom")

    monkeypatch.setattr(clipping, "_release_capture", release_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        private.clipped_sums(max_grad_norm=1.0)
    monkeypatch.setattr(clipping, "_release_capture", real)
    with pytest.raises(PrivacyError, match="forward and backward pass of the batch again"):
        private.clipped_sums(max_grad_norm=1.0)
