"""PrivateModule: clipped per-sample sums against a torch.func float64 reference over the whole
model, for every supported layer, both grad-sample modes and every clipping mode."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ppml_fast.privacy import PrivateModule, UnsupportedModuleError, fix_module
from ppml_fast.privacy.module import NonFiniteGradientError


class Scale(nn.Module):
    """A module no rule knows: the torch.func path."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.tanh(self.w)


class Mixed(nn.Module):
    """Conv1d/2d, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, Linear (2-D and sequence),
    Embedding, a TransformerEncoderLayer (plain MultiheadAttention) and a fallback module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.conv1 = nn.Conv1d(4, 3, 2, dilation=2)
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.scale = Scale(8)
        self.head = nn.Linear(8 + 3 * 14, 5)

    def forward(self, img, tokens):
        a = self.inorm(self.gn(self.conv(img)))  # (B, 4, 4, 4)
        a = self.conv1(a.flatten(2)).flatten(1)  # (B, 3, 14) -> (B, 42)
        s = self.scale(self.rms(self.ln(self.enc(self.emb(tokens)))))  # (B, T, 8)
        return self.head(torch.cat([s.mean(1), a], dim=1))


def _inputs(b=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 2, 8, 8, generator=g, dtype=dtype)
    tokens = torch.randint(0, 11, (b, 5), generator=g)
    y = torch.randint(0, 5, (b,), generator=g)
    return img, tokens, y


def _reference_sums(model, img, tokens, y, max_norm, clipping, gamma=0.01):
    """Per-sample gradients by torch.func over the whole model, clipped and summed, float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, i, t, yy):
        out = functional_call(model, p, (i[None], t[None]))
        return nn.functional.cross_entropy(out, yy[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, img, tokens, y)
    names = list(params)
    sq = {n: g[n].flatten(1).pow(2).sum(1) for n in names}
    total = sum(sq.values()).sqrt()
    out = {}
    for k, n in enumerate(names):
        if clipping == "flat":
            f = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        elif clipping == "automatic":
            f = max_norm / (total + gamma)
        else:
            f = torch.clamp(max_norm[k] / (sq[n].sqrt() + 1e-6), max=1.0)
        out[n] = torch.einsum("b,b...->...", f, g[n])
    return out, total


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
def test_clipped_sums_match_torch_func(mode, clipping):
    torch.manual_seed(0)
    ref_model = Mixed().double()
    model = copy.deepcopy(ref_model)
    private = PrivateModule(model, grad_sample_mode=mode, loss_reduction="mean")
    img, tokens, y = _inputs()
    names = [n for n, _ in model.named_parameters()]
    max_norm = [0.3 + 0.1 * k for k in range(len(names))] if clipping == "per_layer" else 0.7
    out = private(img, tokens)
    nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is None for p in model.parameters())  # autograd skipped the summed grads
    sums, seen = private.clipped_sums(max_grad_norm=max_norm, clipping=clipping)
    assert seen == 6
    want, _ = _reference_sums(ref_model, img, tokens, y, max_norm, clipping)
    by_name = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(sums[by_name[n]], want[n], rtol=1e-8, atol=1e-10, msg=n)


def test_float32_matches_reference():
    torch.manual_seed(1)
    ref_model = Mixed().double()
    model = copy.deepcopy(ref_model).float()
    private = PrivateModule(model)
    img, tokens, y = _inputs(b=8, dtype=torch.float32, seed=3)
    nn.functional.cross_entropy(private(img, tokens), y).backward()
    sums, _ = private.clipped_sums(max_grad_norm=0.5)
    want, _ = _reference_sums(ref_model, img.double(), tokens, y, 0.5, "flat")
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p].double(), want[n], rtol=2e-4, atol=2e-5, msg=n)


def test_shared_parameter_and_module_called_twice():
    torch.manual_seed(2)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    ref = Tied().double()
    model = copy.deepcopy(ref)
    private = PrivateModule(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    nn.functional.cross_entropy(private(x), y, reduction="sum").backward()
    private.loss_reduction = "sum"
    sums, _ = private.clipped_sums(max_grad_norm=0.2)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: nn.functional.cross_entropy(
        functional_call(ref, p, (xi[None],)), yi[None], reduction="sum")), in_dims=(None, 0, 0))(params, x, y)
    total = sum(v.flatten(1).pow(2).sum(1) for v in g.values()).sqrt()
    f = torch.clamp(0.2 / (total + 1e-6), max=1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p], torch.einsum("b,b...->...", f, g[n]), msg=n)


def test_forward_without_backward_is_ignored_and_no_grad_not_captured():
    model = nn.Linear(3, 2)
    private = PrivateModule(model)
    with torch.no_grad():
        private(torch.randn(4, 3))
    assert private.pending_batches() == 0
    private(torch.randn(4, 3))  # forward with grad, never backpropagated
    sums, seen = private.clipped_sums(max_grad_norm=1.0)
    assert sums == {} and seen == 0


def test_nonfinite_raise_and_drop():
    model = nn.Linear(3, 1)
    private = PrivateModule(model, loss_reduction="sum")
    x = torch.tensor([[1.0, 0.0, 0.0], [float("inf"), 0.0, 0.0], [0.0, 2.0, 0.0]])
    private(x).sum().backward()
    with pytest.raises(NonFiniteGradientError, match="samples \\[1\\]"):
        private.clipped_sums(max_grad_norm=10.0, step=7)
    assert private.pending_batches() == 1  # nothing forgotten
    sums, _ = private.clipped_sums(max_grad_norm=10.0, nonfinite="drop")
    torch.testing.assert_close(sums[model.weight], torch.tensor([[1.0, 2.0, 0.0]]))
    torch.testing.assert_close(sums[model.bias], torch.tensor([2.0]))


def test_batchnorm_refused_naming_the_layer_and_fix_module():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(UnsupportedModuleError, match="1 \\(BatchNorm2d\\)"):
        PrivateModule(model)
    fixed = fix_module(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_channels == 8
    PrivateModule(fixed)


def test_remove_hooks_restores_the_module():
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    x = torch.randn(2, 3, 8)
    model.eval()
    before = model(x)
    private = PrivateModule(model)
    assert "forward" in model.self_attn.__dict__
    original = private.remove_hooks()
    assert original is model and "forward" not in model.self_attn.__dict__
    torch.testing.assert_close(model(x), before)


def test_rule_layers_run_their_own_forward_and_are_restored():
    # rule layers are captured by replacing their forward (no hooks, no requires_grad switching):
    # the output is the module's own, captured or not, and remove_hooks() restores every module
    torch.manual_seed(3)
    model = Mixed().double()
    ref = copy.deepcopy(model)
    img, tokens, y = _inputs()
    private = PrivateModule(model)
    replaced = {type(m) for m in model.modules() if "forward" in m.__dict__}
    assert replaced == {nn.Conv2d, nn.Conv1d, nn.GroupNorm, nn.Embedding, nn.LayerNorm, nn.RMSNorm,
                        nn.Linear, nn.MultiheadAttention}
    assert not model.head._forward_pre_hooks and model.inorm._forward_pre_hooks  # hooks: the rest
    out = private(img, tokens)
    torch.testing.assert_close(out, ref(img, tokens), rtol=1e-12, atol=1e-14)  # MHA re-implemented
    assert all(p.requires_grad for p in model.parameters())
    nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(private(img, tokens), ref(img, tokens), rtol=1e-12, atol=1e-14)
    private.remove_hooks()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_bad_arguments():
    with pytest.raises(TypeError, match="module"):
        PrivateModule("nope")
    with pytest.raises(ValueError, match="grad_sample_mode"):
        PrivateModule(nn.Linear(2, 2), grad_sample_mode="fast")
    with pytest.raises(ValueError, match="loss_reduction"):
        PrivateModule(nn.Linear(2, 2), loss_reduction="max")


def test_bfloat16_model_clips_with_float32_factors():
    from ppml_fast.privacy.clipping import _factor_dtype

    f = torch.tensor([0.99951171875 + 2**-12], dtype=torch.float64)  # rounds up to 1.0 in bf16
    g16 = torch.zeros(1, dtype=torch.bfloat16)
    assert _factor_dtype(f, g16).dtype == torch.float32
    assert float(_factor_dtype(f, g16)) < 1.0
    assert _factor_dtype(f, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    torch.manual_seed(3)
    model = nn.Linear(16, 4).to(torch.bfloat16)
    private = PrivateModule(model, loss_reduction="sum")
    private((torch.randn(8, 16) * 10).to(torch.bfloat16)).float().pow(2).sum().backward()
    sums, _ = private.clipped_sums(max_grad_norm=1.0)
    assert sums[model.weight].dtype == torch.float32 and torch.isfinite(sums[model.weight]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_low_precision_sums_keep_the_sensitivity(dtype, mode):
    # Neighbouring batches (the second lacks the last sample) of 64 gradients in one orthant, each
    # clipped to C = 1: the clipped sums must differ by at most C. Rounded to 16 bits before the
    # noise, sums of size ~60 would move by up to 2^-8 of their size: the difference exceeds C.
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).to(dtype)
    x = (torch.rand(64, 4, generator=torch.Generator().manual_seed(1)) + 2.0).to(dtype)

    def sums_of(batch):
        private = PrivateModule(model, grad_sample_mode=mode, loss_reduction="sum")
        private(batch).float().sum().backward()
        s, _ = private.clipped_sums(max_grad_norm=1.0)
        private.remove_hooks()
        return s[model.weight]

    full, neighbour = sums_of(x), sums_of(x[:-1])
    assert float((full.float() - neighbour.float()).norm()) <= 1.0 + 1e-5
    assert full.dtype == torch.float32
    assert 50.0 < float(full.norm()) < 64.0


class _KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x, keyword=True):
        h = torch.tanh(self.a(x))
        return self.b(input=h) if keyword else self.b(h)


def _sums(model, x, **kw):
    private = PrivateModule(model, loss_reduction="sum")
    private(x, **kw).pow(2).sum().backward()
    sums, _ = private.clipped_sums(max_grad_norm=0.5)
    private.remove_hooks()
    return sums


def test_keyword_input_is_captured_and_other_signatures_refused():
    torch.manual_seed(4)
    model = _KeywordCall().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    by_keyword, positional = _sums(model, x, keyword=True), _sums(model, x, keyword=False)
    assert set(by_keyword) == set(model.parameters())
    for p in model.parameters():
        torch.testing.assert_close(by_keyword[p], positional[p], rtol=0, atol=0)
    private = PrivateModule(model)
    private.recorder.start_batch(5)  # inside a captured forward pass
    with pytest.raises(TypeError, match="takes one argument, 'input'"):
        private.module.b(x=torch.zeros(5, 4, dtype=torch.float64))
    private.remove_hooks()


def test_user_patched_forward_is_kept_and_clipped_by_torch_func():
    torch.manual_seed(5)
    ref = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model = copy.deepcopy(ref)
    for m in (ref, model):  # an adapter-style patch on one instance
        m[2].forward = types.MethodType(lambda s, i: nn.Linear.forward(s, i) * 5 + 1, m[2])
    x = torch.randn(6, 3, dtype=torch.float64)
    private = PrivateModule(model, loss_reduction="sum")
    out = private(x)
    torch.testing.assert_close(out, ref(x))
    out.pow(2).sum().backward()
    sums, _ = private.clipped_sums(max_grad_norm=0.5)
    params = {n: p.detach() for n, p in ref.named_parameters()}

    def loss(p, xi):
        return functional_call(ref, p, (xi[None],)).pow(2).sum()

    g = vmap(grad(loss), in_dims=(None, 0))(params, x)
    norms = sum(g[n].flatten(1).pow(2).sum(1) for n in g).sqrt()
    f = torch.clamp(0.5 / (norms + 1e-6), max=1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p], torch.einsum("b,b...->...", f, g[n]), msg=n)
    private.remove_hooks()
    assert "forward" in model[2].__dict__  # the user's patch stays
    mha = nn.MultiheadAttention(4, 2)
    mha.forward = types.MethodType(lambda s, q, k, v, **kw: nn.MultiheadAttention.forward(s, q, k, v, **kw), mha)
    with pytest.raises(UnsupportedModuleError, match="forward was replaced"):
        PrivateModule(mha)


def test_wrapping_twice_is_refused_and_remove_hooks_keeps_later_patches():
    model = nn.Sequential(nn.Linear(3, 2))
    first = PrivateModule(model)
    with pytest.raises(ValueError, match="already wrapped by a PrivateModule"):
        PrivateModule(model)
    mine = types.MethodType(lambda s, i: nn.Linear.forward(s, i), model[0])
    model[0].forward = mine  # replaced by the user after wrapping
    first.remove_hooks()
    assert model[0].__dict__["forward"] is mine
    del model[0].forward
    second = PrivateModule(model)  # after remove_hooks, wrapping again works
    second.remove_hooks()


def test_functional_call_and_frozen_layers():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    private = PrivateModule(model)
    x = torch.randn(5, 3)
    swapped = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    out = functional_call(private, {"_module." + n: t for n, t in swapped.items()}, (x,))
    grads = torch.autograd.grad(out.sum(), list(swapped.values()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # plain autograd through it
    private.discard()
    model[2].requires_grad_(False)  # a whole layer frozen after wrapping
    private(x).sum().backward()
    sums, seen = private.clipped_sums(max_grad_norm=1.0)
    assert seen == 5 and set(sums) == {model[0].weight, model[0].bias}


def test_deep_copy_of_a_wrapped_model_is_a_plain_model():
    # e.g. an EMA or evaluation copy: its layers carry the wrapper's forwards and hooks, but they
    # must neither record into the original's pending batch nor switch its parameters
    torch.manual_seed(7)
    model = Mixed().double()
    private = PrivateModule(model)
    img, tokens, y = _inputs()
    nn.functional.cross_entropy(private(img, tokens), y).backward()  # a pending batch
    calls = len(private.recorder.batches[0].calls)
    clone = copy.deepcopy(model)
    nn.functional.cross_entropy(clone(img, tokens), y).backward()
    assert len(private.recorder.batches) == 1 and len(private.recorder.batches[0].calls) == calls
    assert all(p.grad is not None for p in clone.parameters())  # plain autograd in the copy
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    sums, seen = private.clipped_sums(max_grad_norm=0.7)
    want, _ = _reference_sums(model, img, tokens, y, 0.7, "flat")
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p], want[n], rtol=1e-8, atol=1e-10, msg=n)


def test_layers_frozen_when_wrapped_are_clipped_once_unfrozen():
    # a fine-tuning schedule: layers frozen at make_private, unfrozen later (also the hooked
    # InstanceNorm and the torch.func Scale), must then be clipped, not left to the noise alone
    torch.manual_seed(8)
    model = Mixed().double()
    for m in (model.conv, model.inorm, model.scale, model.head):
        m.requires_grad_(False)
    private = PrivateModule(model, loss_reduction="mean")
    img, tokens, y = _inputs()
    nn.functional.cross_entropy(private(img, tokens), y).backward()
    sums, _ = private.clipped_sums(max_grad_norm=0.7)
    assert model.head.weight not in sums and model.scale.w not in sums
    model.requires_grad_(True)
    nn.functional.cross_entropy(private(img, tokens), y).backward()
    sums, _ = private.clipped_sums(max_grad_norm=0.7)
    want, _ = _reference_sums(model, img, tokens, y, 0.7, "flat")
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p], want[n], rtol=1e-8, atol=1e-10, msg=n)


def test_deep_copies_can_be_wrapped_and_a_wrapper_copies_itself():
    torch.manual_seed(9)
    model = Mixed().double()
    private = PrivateModule(model)
    img, tokens, y = _inputs()
    want, _ = _reference_sums(model, img, tokens, y, 0.7, "flat")
    for copied in (PrivateModule(copy.deepcopy(model)), copy.deepcopy(private)):
        assert isinstance(copied, PrivateModule) and copied.module is not model
        nn.functional.cross_entropy(copied(img, tokens), y).backward()
        sums, seen = copied.clipped_sums(max_grad_norm=0.7)
        assert seen == 6 and private.pending_batches() == 0
        for n, p in copied.module.named_parameters():
            torch.testing.assert_close(sums[p], want[n], rtol=1e-8, atol=1e-10, msg=n)
        inner = copied.remove_hooks()
        assert not any("forward" in m.__dict__ for m in inner.modules())  # a plain model again


def test_parametrized_layer_is_refused_naming_it():
    from torch.nn.utils import parametrize

    class Symmetric(nn.Module):
        def forward(self, w):
            return w + w.T

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    parametrize.register_parametrization(model[0], "weight", Symmetric())
    with pytest.raises(UnsupportedModuleError, match="0 \\(ParametrizedLinear\\): parametrized"):
        PrivateModule(model)
