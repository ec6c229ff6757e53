"""transformers' ViTEmbeddings (cls token, position table, mask token) in closed form
(ppml_fast.privacy.vit_embeddings): the engine's clipped sums equal the float64 per-record
reference through it, it is really used, and torch.func takes over whenever its assumptions
fail (dropout, interpolated positions, overridden or patched forwards, a forward that computes
something else)."""

import copy
import types

import pytest
import torch
from torch import nn

from ppml_fast.privacy import fallback, vit_embeddings
from tests.privacy.sensitivity._harness import (
    Case, cast, clip_and_sum, engine_sums, lowered, per_record_grads)

transformers = pytest.importorskip("transformers")
from transformers.models.vit import modeling_vit  # noqa: E402


class _Model(nn.Module):
    """ViTEmbeddings, a token mix inside each record, a linear head."""

    def __init__(self, dropout=0.0, mask_token=False):
        super().__init__()
        cfg = transformers.ViTConfig(hidden_size=8, image_size=8, patch_size=4, num_channels=3,
                                     hidden_dropout_prob=dropout)
        torch.manual_seed(0)
        self.emb = modeling_vit.ViTEmbeddings(cfg, use_mask_token=mask_token)
        with torch.no_grad():
            for p in (self.emb.cls_token, self.emb.position_embeddings):
                p.normal_()
            if mask_token:
                self.emb.mask_token.normal_()
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask=None, interpolate=False):
        kw = {"interpolate_pos_encoding": True} if interpolate else {}
        e = self.emb(x, bool_masked_pos=mask, **kw) if mask is not None else self.emb(x, **kw)
        return self.head(torch.tanh(e).mean(1))


def _check(model64, inputs, dtype=torch.float64, tol=1e-9):
    target = torch.tensor([0, 1, 2, 1, 0])
    case = Case(name="vit-emb", build=lambda: model64, inputs=inputs, target=target,
                forward_loss=lambda m, x, y: nn.functional.cross_entropy(
                    m(**x) if isinstance(x, dict) else m(x), y), dtype=dtype, mode="ghost")
    model = lowered(case, model64)
    per_record = per_record_grads(case, copy.deepcopy(model).double(), cast(inputs, torch.float64), target)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_record.values()]).sum(0).sqrt()
    case = case.with_(C=float(norms.median()))
    want, _ = clip_and_sum(case, per_record)
    got = engine_sums(case, model, cast(inputs, dtype), target)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=tol, atol=tol * float(want[n].norm() + 1))
    return got


def _inputs(masked=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    if not masked:
        return {"x": x}
    return {"x": x, "mask": torch.rand(5, 4, generator=g) < 0.5}


@pytest.fixture
def calls(monkeypatch):
    """Counts the closed form's successes and torch.func's runs on ViTEmbeddings."""
    seen = {"closed": 0, "func": 0}
    closed, func = vit_embeddings.per_sample, fallback.per_sample_grads

    def closed_counted(*a, **k):
        out = closed(*a, **k)
        seen["closed"] += out is not None
        return out

    def func_counted(module, *a, **k):
        seen["func"] += isinstance(module, modeling_vit.ViTEmbeddings)
        return func(module, *a, **k)

    monkeypatch.setattr(vit_embeddings, "per_sample", closed_counted)
    monkeypatch.setattr(fallback, "per_sample_grads", func_counted)
    return seen


@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_per_record_reference_through_the_closed_form(calls, masked):
    _check(_Model(mask_token=True).double(), _inputs(masked))
    assert calls["closed"] >= 1 and calls["func"] == 0


def test_float32_equals_the_reference(calls):
    _check(_Model().double(), _inputs(), dtype=torch.float32, tol=1e-5)
    assert calls["closed"] >= 1 and calls["func"] == 0


def test_dropout_in_training_goes_to_torch_func(calls):
    """p > 0 in training: the output gradient is not the embeddings' gradient; torch.func (which
    cannot replay dropout record by record) refuses rather than guessing."""
    from ppml_fast.privacy.layers import UnsupportedModuleError

    with pytest.raises(UnsupportedModuleError):
        _check(_Model(dropout=0.5).double(), _inputs())
    assert calls["closed"] == 0


def test_interpolated_positions_go_to_torch_func(calls):
    inputs = dict(_inputs(), interpolate=True)
    _check(_Model().double(), inputs)
    assert calls["closed"] == 0 and calls["func"] >= 1


def test_overridden_or_patched_forwards_go_to_torch_func(calls):
    class Doubled(modeling_vit.ViTEmbeddings):  # the position table counted twice
        def forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
            return super().forward(pixel_values) + self.position_embeddings

    m = _Model().double()
    m.emb.__class__ = Doubled
    _check(m, _inputs())
    assert calls["closed"] == 0 and calls["func"] >= 1

    m = _Model().double()  # the instance's forward replaced: the user's code runs
    stock = m.emb.forward
    m.emb.forward = types.MethodType(lambda self, x, **k: stock(x, **k) * 1.5, m.emb)
    _check(m, _inputs())
    assert calls["closed"] == 0


def test_a_patched_class_forward_that_computes_something_else_is_not_trusted(monkeypatch, calls):
    """The class's forward replaced (a library patch): the one-time agreement check runs again
    for the new function and fails, so torch.func differentiates what really runs."""
    stock = modeling_vit.ViTEmbeddings.forward

    def patched(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
        out = stock(self, pixel_values, bool_masked_pos, interpolate_pos_encoding)
        return torch.cat([out[:, :1], out[:, 1:] + self.position_embeddings[:, 1:]], 1)

    monkeypatch.setattr(modeling_vit.ViTEmbeddings, "forward", patched)
    _check(_Model().double(), _inputs())
    assert calls["closed"] == 0 and calls["func"] >= 1
    key = (modeling_vit.ViTEmbeddings, patched)
    assert vit_embeddings._agrees.get(key) is False


def test_a_model_bench_vit_step_uses_the_closed_form(calls):
    from ppml_fast.benchmarks.model_zoo import MODELS, SIZES, forward_loss, make_batch
    from tests.privacy.sensitivity._harness import Case as _Case

    spec = MODELS["vit"]
    model64 = spec.build(SIZES["test"]).double()
    inputs, target = make_batch(spec, SIZES["test"], seed=1)
    case = _Case(name="vit", build=lambda: model64, inputs=inputs, target=target,
                 forward_loss=forward_loss, dtype=torch.float64, mode="ghost", C=1.0)
    engine_sums(case, lowered(case, model64), inputs, target)
    assert calls["closed"] == 1 and calls["func"] == 0
