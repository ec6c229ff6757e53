"""nn.MultiheadAttention beyond self-attention (cross-attention with the packed weight, kdim/vdim,
bias_k/bias_v, add_zero_attn, masks, layouts) and nn.TransformerDecoderLayer / TransformerDecoder /
Transformer under PrivateModule: per-sample norms and clipped sums against a torch.func float64
per-sample reference, ghost = materialise, the same outputs as torch's forward, parts of a packed
parameter kept on the ghost/book-keeping path, and one DP step through PrivacyEngine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine, PrivateModule

# vmap over scaled_dot_product_attention (the reference) warns that it has no batching rule
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

E, H, B, L, S = 8, 2, 4, 3, 5
F64 = torch.float64


def _reference(model, args, in_dims, y, max_norm, clipping):
    """Per-sample gradients of every parameter by vmap(grad) over samples (float64), their norms
    and the clipped sums (flat: min(1, C/(||g||+1e-6)); per_layer: the same per parameter)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, yi, *a):
        a = tuple(x.unsqueeze(d) for x, d in zip(a, in_dims))
        return nn.functional.cross_entropy(functional_call(model, p, a), yi[None], reduction="sum")

    g = vmap(grad(loss), in_dims=(None, 0, *in_dims))(params, y, *args)
    sq = {n: g[n].flatten(1).pow(2).sum(1) for n in params}
    total = sum(sq.values()).sqrt()
    sums = {}
    for n in params:
        norm = total if clipping == "flat" else sq[n].sqrt()
        f = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        sums[n] = torch.einsum("b,b...->...", f, g[n])
    return sums, sq, total


def _check(ref_model, args, in_dims, y, *, mode, clipping="flat", batch_first=True, max_norm=0.5):
    """PrivateModule(mode) on a copy of ref_model: outputs, per-parameter norms and clipped sums
    equal the reference; returns the PrivateModule's per-call records of the batch."""
    model = copy.deepcopy(ref_model)
    private = PrivateModule(model, grad_sample_mode=mode, batch_first=batch_first)
    out = private(*args)
    torch.testing.assert_close(out, ref_model(*args), rtol=1e-12, atol=1e-12)
    nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is None for p in model.parameters())
    calls = list(private.recorder.batches[0].calls)
    plan = private._norms(private.recorder.batches[0])
    sums, seen = private.clipped_sums(max_grad_norm=max_norm, clipping=clipping)
    want, sq, total = _reference(ref_model, args, in_dims, y, max_norm, clipping)
    assert seen == y.shape[0]
    torch.testing.assert_close(plan["total"].sqrt(), total, rtol=1e-9, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(plan["per_param"][id(p)] * plan["scale2"], sq[n], rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(sums[p], want[n], rtol=1e-9, atol=1e-12, msg=n)
    return calls, sums, model


# -- nn.MultiheadAttention as cross-attention ---------------------------------------------------
class Cross(nn.Module):
    """One MultiheadAttention call (query = x, key = mem, value = mem or val) and a linear head.
    Inputs in the attention's layout; kpm (B, S) bool; mask3 (B, H, L, S) float (a per-sample
    attn_mask, passed as the (B*H, L, S) mask torch takes)."""

    def __init__(self, mha: nn.MultiheadAttention, *, same_kv: bool, need_weights: bool, masks: str):
        super().__init__()
        self.mha, self.same_kv, self.need_weights, self.masks = mha, same_kv, need_weights, masks
        self.head = nn.Linear(E, 3)
        bool2d = torch.rand(L, S, generator=torch.Generator().manual_seed(5)) < 0.4
        bool2d[:, 0] = False  # no fully masked row
        self.register_buffer("bool2d", bool2d)

    def forward(self, x, mem, val, kpm, mask3):
        kw = {}
        if self.masks in ("kpm", "2d", "3d"):
            kw["key_padding_mask"] = kpm
        if self.masks == "2d":
            kw["attn_mask"] = self.bool2d
        if self.masks == "3d":  # float masks both (torch deprecates mixing bool and float)
            kw["attn_mask"] = mask3.flatten(0, 1)
            kw["key_padding_mask"] = torch.zeros_like(kpm, dtype=x.dtype).masked_fill(kpm, float("-inf"))
        out, _ = self.mha(x, mem, mem if self.same_kv else val, need_weights=self.need_weights, **kw)
        return self.head(out.mean(1 if self.mha.batch_first else 0))


def _cross_inputs(mha: nn.MultiheadAttention, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g, dtype=F64)
    mem = torch.randn(B, S, mha.kdim, generator=g, dtype=F64)
    val = torch.randn(B, S, mha.vdim, generator=g, dtype=F64)
    kpm = torch.rand(B, S, generator=g) < 0.3
    kpm[:, 0] = False
    mask3 = torch.randn(B, H, L, S, generator=g, dtype=F64)
    y = torch.randint(0, 3, (B,), generator=g)
    seq = 0 if mha.batch_first else 1
    if not mha.batch_first:
        x, mem, val = (t.transpose(0, 1) for t in (x, mem, val))
    return (x, mem, val, kpm, mask3), (seq, seq, seq, 0, 0), y


# (MultiheadAttention kwargs, same_kv, need_weights, masks, clipping)
CROSS = {
    "packed_kv_same": (dict(batch_first=True), True, False, "3d", "flat"),
    "packed_kv_same_seqfirst": (dict(batch_first=False), True, True, "kpm", "per_layer"),
    "packed_kv_differ": (dict(batch_first=False), False, True, "2d", "flat"),
    "packed_no_bias": (dict(batch_first=True, bias=False), False, False, "none", "per_layer"),
    "kdim_vdim": (dict(batch_first=True, kdim=5, vdim=3), False, True, "3d", "per_layer"),
    "kdim_vdim_seqfirst": (dict(batch_first=False, kdim=5, vdim=3), False, False, "2d", "flat"),
    "bias_kv_zero_attn": (dict(batch_first=True, kdim=5, vdim=5, add_bias_kv=True, add_zero_attn=True),
                          True, True, "2d", "per_layer"),
    "bias_kv_packed": (dict(batch_first=False, add_bias_kv=True), True, False, "3d", "flat"),
}


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("case", sorted(CROSS))
def test_cross_attention_matches_torch_func(case, mode):
    kw, same_kv, need_weights, masks, clipping = CROSS[case]
    torch.manual_seed(0)
    ref = Cross(nn.MultiheadAttention(E, H, dropout=0.0, **kw), same_kv=same_kv,
                need_weights=need_weights, masks=masks).double()
    args, in_dims, y = _cross_inputs(ref.mha)
    _check(ref, args, in_dims, y, mode=mode, clipping=clipping, batch_first=kw["batch_first"])


def test_ghost_equals_materialise_and_packed_parts_stay_on_the_rule_path(monkeypatch):
    torch.manual_seed(1)
    ref = Cross(nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True), same_kv=False,
                need_weights=False, masks="kpm").double()
    args, in_dims, y = _cross_inputs(ref.mha, seed=1)

    def no_materialising(self, call):
        raise AssertionError("a parameter used on disjoint parts took the materialised path")

    monkeypatch.setattr(PrivateModule, "_per_sample", no_materialising)
    calls, ghost, model = _check(ref, args, in_dims, y, mode="ghost")
    w, b = model.mha.in_proj_weight, model.mha.in_proj_bias
    parts = sorted(c.spans["weight"] for c in calls if c.params.get("weight") is w)
    assert parts == [(0, E * E), (E * E, 2 * E * E), (2 * E * E, 3 * E * E)]
    assert sorted(c.spans["bias"] for c in calls if c.params.get("bias") is b) == [(0, E), (E, 2 * E), (2 * E, 3 * E)]
    monkeypatch.undo()
    _, mat, model2 = _check(ref, args, in_dims, y, mode="materialize")
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        torch.testing.assert_close(ghost[p], mat[p2], rtol=1e-10, atol=1e-12, msg=n)


def test_attention_module_called_twice_shares_its_parameters_and_stays_exact():
    """The same cross-attention on two memories: its parts overlap across calls, so the
    parameters are materialised (placed into full-size per-sample gradients) — still exact."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True)
            self.head = nn.Linear(E, 3)

        def forward(self, x, mem, val, kpm, mask3):
            a, _ = self.mha(x, mem, mem, need_weights=False)
            b, _ = self.mha(a, val, val, key_padding_mask=kpm)
            return self.head(b.mean(1))

    torch.manual_seed(2)
    ref = Twice().double()
    args, in_dims, y = _cross_inputs(ref.mha, seed=2)
    for mode in ("ghost", "materialize"):
        _check(ref, args, in_dims, y, mode=mode, clipping="per_layer")


def test_forward_equals_torch_for_every_call_form():
    """Outputs and attention weights of the recorded forward equal nn.MultiheadAttention's."""
    torch.manual_seed(3)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    for kw in (dict(), dict(kdim=5, vdim=3), dict(add_bias_kv=True, add_zero_attn=True),
               dict(kdim=5, vdim=5, add_bias_kv=True, bias=False)):
        for batch_first in (True, False):
            mha = nn.MultiheadAttention(E, H, dropout=0.0, batch_first=batch_first, **kw).double()
            ref = copy.deepcopy(mha)
            private = PrivateModule(mha, batch_first=batch_first)
            (x, mem, val, kpm, mask3), _, _ = _cross_inputs(mha, seed=4)
            fkpm = torch.zeros_like(kpm, dtype=F64).masked_fill(kpm, float("-inf"))
            calls = [((x, mem, val), dict(key_padding_mask=fkpm, attn_mask=mask3.flatten(0, 1))),
                     ((x, mem, val), dict(attn_mask=causal[:, :1].expand(L, S) > 0)),
                     ((x[:, 0] if batch_first else x[0], mem[0] if batch_first else mem[:, 0],
                       val[0] if batch_first else val[:, 0]), dict(key_padding_mask=kpm[0]))]  # unbatched
            if mha._qkv_same_embed_dim:
                calls += [((x, mem, mem), dict(key_padding_mask=kpm)),
                          ((x, x, x), dict(attn_mask=causal, is_causal=True)),
                          ((x, x, x), dict(attn_mask=causal, is_causal=True, key_padding_mask=fkpm[:, :L]))]
            if not batch_first:  # unbatched inputs ignore batch_first: (L, E), not (B, E)
                calls[2] = ((x[:, 0], mem[:, 0], val[:, 0]), dict(key_padding_mask=kpm[0]))
            for inputs, extra in calls:
                for need_weights in (True, False):
                    for average in (True, False):
                        got = private(*inputs, need_weights=need_weights, average_attn_weights=average, **extra)
                        want = ref(*inputs, need_weights=need_weights, average_attn_weights=average, **extra)
                        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
                        if need_weights:
                            torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
                        else:
                            assert got[1] is None and want[1] is None
            private.discard()
    with pytest.raises(RuntimeError, match="is_causal"):
        private(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        private(x, mem, val, attn_mask=torch.zeros(L + 1, S, dtype=torch.bool))


def test_unbatched_call_inside_a_model():
    class Single(nn.Module):  # a model of one sample that calls attention on unbatched tensors
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, H, dropout=0.0, kdim=5, vdim=5, add_bias_kv=True)
            self.head = nn.Linear(E, 3)

        def forward(self, x, mem, val, kpm, mask3):
            out, _ = self.mha(x[0], mem[0], mem[0], key_padding_mask=kpm[0])
            return self.head(out.mean(0)[None])

    torch.manual_seed(4)
    ref = Single().double()
    args, in_dims, y = _cross_inputs(nn.MultiheadAttention(E, H, kdim=5, vdim=5, batch_first=True), seed=5)
    args = tuple(a[:1] for a in args)
    _check(ref, args, in_dims, y[:1], mode="ghost")


def test_nonfinite_sample_dropped_on_packed_parts():
    torch.manual_seed(7)
    ref = Cross(nn.MultiheadAttention(E, H, dropout=0.0, batch_first=True, add_bias_kv=True), same_kv=True,
                need_weights=False, masks="kpm").double()
    args, in_dims, y = _cross_inputs(ref.mha, seed=7)
    args[1][1, 2, 0] = float("inf")  # sample 1's memory
    model = copy.deepcopy(ref)
    private = PrivateModule(model)
    nn.functional.cross_entropy(private(*args), y, reduction="sum").backward()
    private.loss_reduction = "sum"
    sums, seen = private.clipped_sums(max_grad_norm=0.5, nonfinite="drop")
    keep = torch.tensor([0, 2, 3])
    want, _, _ = _reference(ref, tuple(a[keep] for a in args), in_dims, y[keep], 0.5, "flat")
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p], want[n], rtol=1e-9, atol=1e-12, msg=n)


def test_empty_batch():
    for batch_first in (True, False):
        model = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=batch_first)
        model.multihead_attn = nn.MultiheadAttention(E, H, batch_first=batch_first, add_bias_kv=True,
                                                     add_zero_attn=True)
        private = PrivateModule(model, batch_first=batch_first)
        tgt, mem = torch.randn(0, L, E), torch.randn(0, S, E)
        if not batch_first:
            tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        private(tgt, mem, tgt_mask=causal, tgt_is_causal=True).sum().backward()
        sums, seen = private.clipped_sums(max_grad_norm=1.0)
        assert seen == 0 and len(sums) == len(list(model.parameters()))
        assert all(sums[p].shape == p.shape and not sums[p].any() for p in model.parameters())


# -- nn.TransformerDecoderLayer ------------------------------------------------------------------
class Decoder(nn.Module):
    def __init__(self, *, norm_first: bool, batch_first: bool):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=16, dropout=0.0,
                                                batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(E, 3)
        self.seq = 1 if batch_first else 0

    def forward(self, tgt, mem, mem_kpm, tgt_kpm):
        t = tgt.shape[self.seq]  # a bool causal mask, as the bool padding masks (no mixed types)
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt.device).triu(1)
        out = self.layer(tgt, mem, tgt_mask=causal, tgt_is_causal=True,
                         memory_key_padding_mask=mem_kpm, tgt_key_padding_mask=tgt_kpm)
        return self.head(out.mean(self.seq))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_layer_matches_torch_func(norm_first, batch_first, mode):
    torch.manual_seed(5)
    ref = Decoder(norm_first=norm_first, batch_first=batch_first).double()
    g = torch.Generator().manual_seed(6)
    tgt = torch.randn(B, L, E, generator=g, dtype=F64)
    mem = torch.randn(B, S, E, generator=g, dtype=F64)
    mem_kpm = torch.rand(B, S, generator=g) < 0.3
    mem_kpm[:, 0] = False
    tgt_kpm = torch.zeros(B, L, dtype=torch.bool)
    tgt_kpm[:, -1] = batch_first  # padding in one layout (SDPA path with a mask), none in the other
    y = torch.randint(0, 3, (B,), generator=g)
    seq = 0 if batch_first else 1
    if not batch_first:
        tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
    calls, _, model = _check(ref, (tgt, mem, mem_kpm, tgt_kpm), (seq, seq, 0, 0), y,
                             mode=mode, batch_first=batch_first, clipping="flat" if norm_first else "per_layer")
    self_w, cross_w = model.layer.self_attn.in_proj_weight, model.layer.multihead_attn.in_proj_weight
    self_calls = [c for c in calls if c.params.get("weight") is self_w]
    assert len(self_calls) == 1 and self_calls[0].spans is None  # self-attention: one packed call
    assert sorted(c.spans["weight"] for c in calls if c.params.get("weight") is cross_w) == [
        (0, E * E), (E * E, 3 * E * E)]  # query rows on the target stream, k and v rows on the memory


# -- PrivacyEngine end to end ----------------------------------------------------------------------
class Seq2Seq(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        if kind == "decoder":
            layer = nn.TransformerDecoderLayer(E, H, 16, dropout=0.0, batch_first=True, norm_first=True)
            self.net = nn.TransformerDecoder(layer, num_layers=2, norm=nn.LayerNorm(E))
        else:
            self.net = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1,
                                      dim_feedforward=16, dropout=0.0, batch_first=True)
        self.kind = kind
        self.head = nn.Linear(E, 3)

    def forward(self, a, b):
        causal = nn.Transformer.generate_square_subsequent_mask(a.shape[1])
        if self.kind == "decoder":  # a = target stream, b = memory
            out = self.net(a, b, tgt_mask=causal, tgt_is_causal=True)
        else:  # a = target, b = source
            out = self.net(b, a, tgt_mask=causal, tgt_is_causal=True)
        return self.head(out.mean(1))


@pytest.mark.parametrize("grad_sample_mode", ["ghost", "materialize"])
@pytest.mark.parametrize("kind", ["decoder", "transformer"])
def test_privacy_engine_step(kind, grad_sample_mode):
    torch.manual_seed(6)
    model = Seq2Seq(kind)
    g = torch.Generator().manual_seed(7)
    data = TensorDataset(torch.randn(32, L, E, generator=g), torch.randn(32, S, E, generator=g),
                         torch.randint(0, 3, (32,), generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode=grad_sample_mode, noise_seed=0,
        generator=torch.Generator().manual_seed(8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tgt, mem, y = next(iter(loader))
    opt.zero_grad()
    nn.functional.cross_entropy(private(tgt, mem), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n
    assert opt.steps == 1 and engine.get_epsilon(1e-5) > 0


def test_returned_weights_are_the_dropped_out_ones_as_torch_returns_them():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
    x, mem = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    torch.manual_seed(1)
    want = mha(x, mem, mem)
    private = PrivateModule(mha)
    torch.manual_seed(1)
    got = mha(x, mem, mem)
    private.remove_hooks()
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    assert not torch.allclose(got[1].sum(-1), torch.ones(2, 3))  # dropout did act on them
