"""Review S9, third pass: attacks on the records probe after commits abbceda / 9a22231 (outputs
tapped by their probed record dimension, mappings rebuilt, the fail-closed hidden-tensor walk,
scalar / enum / numpy / config arguments keyed by value, graph-building backward refused, the
torch.func path's random-weight sum check). One DP step at noise 0, float64, C = 1: ||Delta||
is the clipped sum's move when one record is removed (bound C) or replaced (bound 2 C). Open bugs
are ``xfail(strict=True)`` with the measured number and a fix in the reason.

Open (most severe first):
- the (E,) aggregate of round 2, shifted into a slot probed as per record by an output the model
  returns only at other batch sizes (tap_outputs matches outputs to ``classes`` by position):
  6.12 C on replacing a record (bound 2 C);
- per-record values the probe never perturbs: tensors in a ``collections.deque``, in a parent
  class's ``__slots__``, in a Mapping whose ``values()`` lies (2.79 C each); a tensor argument
  probed with one row (shared, (1, D)) and reused with B rows (the layout masks the record
  dimension whatever its size: 2.79 C); per-record values in a Python list / tuple / numpy array
  (keyed by value, never perturbed: 1.61 C);
- a Python scalar computed from the batch and passed to a torch.func-path layer (call_tensors
  compares tensors only; _check_sum reruns with the same scalar): 1.99 C;
- a 0-dim tensor flag (shape-keyed, value not in the layout; the Python-bool version of round 2
  is fixed): 1.78 C;
- forward-mode AD (torch.autograd.forward_ad / a tangent penalty): the bound holds, but the
  clipped sum is silently 76 % off the reference (the tangent's dependence on the weights is
  dropped: the rule layers run on detached weights).
Holding: torch.autograd.functional.vjp(create_graph=True) and torch.func.grad through the private
model are refused as graph-building; a 0-dim tensor scale in a torch.func layer and a tensor of
lengths are refused; HF ViT with / without labels, BERT + peft LoRA, a dict of flags with a
(logits, unused aux) output are accepted.
Cost (not asserted; bench BERT, B = 16, float32, one thread, interleaved medians of 60 rounds,
/work/notes/s9_round3/cost.py): non-private step 6.5 ms, DP step 9.5 ms, DP step with the probe
(cache cleared) 218.8 ms; a float argument that changes every call (temperature) re-probes every
step: 219.4 ms (23x) and grows ``_verified`` by one entry per step.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine, PrivacyError
from tests.privacy.sensitivity._harness import Case, check_case, flat_norm, scaled

B, T, D, K = 6, 2, 16, 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seeded(cls, *args):
    def build():
        torch.manual_seed(0)
        return cls(*args).double()
    return build


def _x(t=T):
    x = torch.randn(B, t, D, generator=_gen(1), dtype=torch.float64)
    return scaled(scaled(x, 0, 30.0), 1, 1e-2)


Y = torch.randint(0, K, (B,), generator=_gen(9))
FEATS = torch.randn(B, D, generator=_gen(3), dtype=torch.float64)
FEATS[0] *= 20


def _private(model, b=B, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.arange(b)), batch_size=b),
            noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, **kw)


def _warm_once(model, *args):
    """A first forward of the engine's private model (probed, never backpropagated), skipped for
    the harness's float64 reference model (which has no recorder)."""
    if hasattr(model, "recorder") and not getattr(model, "_round3_warm", False):
        model._round3_warm = True
        model(*args)


# -- 1. outputs whose structure changes at another batch size ------------------------------------
E = 4


class MoEShift(nn.Module):
    """(logits, [router probabilities if B > E], load (E,)): at B = E the load moves into the slot
    the probe (at B = 6) classed as per record, dimension 0."""

    def __init__(self):
        super().__init__()
        self.router, self.e1 = nn.Linear(D, E), nn.Linear(D, K)

    def forward(self, x):
        h = x.mean(1)
        p = torch.softmax(self.router(h), -1)
        outs = [self.e1(h) * p[:, :1]]
        if x.shape[0] > E:
            outs.append(p)
        outs.append(E * p.mean(0) ** 2)
        return tuple(outs)


def _shift_sums(x, y, warm, aux=1000.0):
    model = _seeded(MoEShift)()
    private, opt, _ = _private(model, b=len(y))
    opt.zero_grad()
    out = private(warm)
    (nn.functional.cross_entropy(out[0], Y) + aux * out[-1].sum()).backward()
    with pytest.raises(PrivacyError, match="not per record"):
        opt.step()  # at the probed batch size the load is tapped and refused
    opt.zero_grad()
    out = private(x)
    (nn.functional.cross_entropy(out[0], y) + aux * out[-1].sum()).backward()
    opt.step()
    return {n: p.grad.double() * len(y) for n, p in model.named_parameters()}


def test_output_structure_change_at_another_batch_size():
    warm = torch.randn(B, T, D, generator=_gen(4), dtype=torch.float64)
    x = torch.randn(E, T, D, generator=_gen(5), dtype=torch.float64) * 0.1
    y = Y[:E]
    xr = x.clone()
    xr[0] = 10.0 * _seeded(MoEShift)().router.weight[1].detach().reshape(1, D).expand(T, D)
    try:
        a, b = _shift_sums(x, y, warm), _shift_sums(xr, y, warm)
    except PrivacyError:
        return
    delta = flat_norm({n: a[n] - b[n] for n in a})
    assert delta <= 2.0 + 1e-9, f"record 0 replaced at B = E: {delta:.4f} C"  # today: 6.1204 C


# -- 2. per-record values the probe never perturbs ----------------------------------------------
class HolderModel(nn.Module):
    """``forward(x, holder)``: the records' features from ``holder`` (by ``GET``), mixed through
    their batch mean (no gradient path: only the probe's perturbation shows it)."""

    get = staticmethod(lambda h: h)

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, holder):
        f = self.get(holder)
        h = torch.tanh(self.fc(x.mean(1) + f))
        return self.head(h + 3 * f.mean(0, keepdim=True))


class _Base:
    __slots__ = ("feats",)


class _Child(_Base):  # its own __slots__ is empty: the parent's slot holds the tensor
    __slots__ = ()


def _child(f):
    c = _Child()
    c.feats = f
    return c


class _LyingMapping(collections.abc.Mapping):
    """Looks empty to keys() / values() / items() / iteration; ``m["feats"]`` still works."""

    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def keys(self):
        return []

    def values(self):
        return []

    def items(self):
        return []


HOLDERS = {
    "deque": (lambda f: collections.deque([f]), lambda h: h[0]),
    "inherited_slots": (_child, lambda h: h.feats),
    "lying_mapping": (lambda f: _LyingMapping({"feats": f}), lambda h: h["feats"]),
}


def _holder_case(name):
    wrap, get = HOLDERS[name]
    cls = type(f"Holder_{name}", (HolderModel,), {"get": staticmethod(get)})
    return Case(name=f"holder_{name}", build=_seeded(cls), inputs=(_x(), FEATS), target=Y, adversarial=(0,),
                refuse_ok=True,
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(inp[0], wrap(inp[1])), y))


def test_holder_control_dict_is_probed():
    out = check_case(Case(name="holder_dict", build=_seeded(type("H", (HolderModel,), {
        "get": staticmethod(lambda h: h["feats"])})), inputs=(_x(), FEATS), target=Y, adversarial=(0,),
        refuse_ok=True, forward_loss=lambda m, inp, y: nn.functional.cross_entropy(
            m(inp[0], {"feats": inp[1]}), y)))
    assert out.refused is not None and "changed when only" in out.refused, out


@pytest.mark.parametrize("name", sorted(HOLDERS))
def test_records_in_containers_the_walk_misses(name):
    out = check_case(_holder_case(name), replace=True)  # today: AssertionError, 2.7851 x the bound
    assert out.refused is not None, out


class Cond(nn.Module):
    """``cond`` (1, D), shared by the batch, or (B, D), one row per record; its batch mean enters
    every record."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, cond):
        h = torch.tanh(self.fc(x.mean(1) + cond))
        return self.head(h + 3 * cond.mean(0, keepdim=True))


def test_per_record_condition_probed_first_is_refused():
    case = Case(name="cond_rows", build=_seeded(Cond), inputs=(_x(), FEATS), target=Y, adversarial=(0,),
                refuse_ok=True)
    assert check_case(case, replace=True).refused is not None


def test_shared_row_then_per_record_rows_is_probed_again():
    def loss(m, inp, y):
        _warm_once(m, inp[0], inp[1][:1].clone())  # probed with one shared row: accepted
        return nn.functional.cross_entropy(m(*inp), y)

    case = Case(name="cond_shared_then_rows", build=_seeded(Cond), inputs=(_x(), FEATS), target=Y,
                adversarial=(0,), refuse_ok=True, forward_loss=loss)
    assert check_case(case, replace=True).refused is not None  # today: AssertionError, 2.7851 C


class LenNorm(nn.Module):
    """Each record scaled by its length over the batch's longest: per-record lengths mixed."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, lengths):
        m = max(lengths)
        s = torch.as_tensor([float(v) / float(m) for v in lengths], dtype=x.dtype)[:, None]
        return self.head(torch.tanh(self.fc(x.mean(1))) * s)


LENGTHS = torch.tensor([40, 1, 2, 3, 2, 1])


def _lengths_case(wrap):
    return Case(name=f"lengths_{wrap.__name__}", build=_seeded(LenNorm), inputs=(_x(), LENGTHS), target=Y,
                adversarial=(0,), refuse_ok=True,
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(inp[0], wrap(inp[1])), y))


def test_per_record_lengths_as_a_tensor_are_probed():
    assert check_case(_lengths_case(lambda t: t)).refused is not None


@pytest.mark.parametrize("wrap", [lambda t: t.tolist(), lambda t: tuple(t.tolist()), lambda t: t.numpy()],
                         ids=["list", "tuple", "numpy"])
def test_per_record_lengths_as_python_values_are_probed(wrap):
    assert check_case(_lengths_case(wrap)).refused is not None  # today: AssertionError, 1.6110 C


# -- 3. a Python scalar into a torch.func-path layer ---------------------------------------------
class ScaledGate(nn.Module):
    """No rule (torch.func path); ``scale`` enters only the gradient of ``w`` (value h * w)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(D))

    def forward(self, h, scale=1.0):
        return h * self.w + h * (self.w - self.w.detach()) * (scale - 1.0)


class ScaleNet(nn.Module):
    def __init__(self, as_tensor):
        super().__init__()
        self.gate, self.head, self.as_tensor = ScaledGate(), nn.Linear(D, K), as_tensor

    def forward(self, x):
        h = x.mean(1)
        s = h.detach().abs().max()  # a batch-wide value
        return self.head(torch.tanh(self.gate(h, scale=s if self.as_tensor else float(s))))


def test_batch_wide_tensor_argument_of_a_torch_func_layer_is_refused():
    case = Case(name="scale_tensor", build=_seeded(ScaleNet, True), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True)
    out = check_case(case, replace=True)
    assert out.refused is not None and "not per record" in out.refused, out


def test_batch_wide_python_scalar_of_a_torch_func_layer_is_refused():
    case = Case(name="scale_float", build=_seeded(ScaleNet, False), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True)
    assert check_case(case, replace=True).refused is not None  # today: AssertionError, 1.9907 C


# -- 4. a 0-dim tensor flag -----------------------------------------------------------------------
class Center(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, center):
        h = torch.tanh(self.fc(x.mean(1)))
        if bool(center):
            h = h - 3 * h.detach().mean(0, keepdim=True)
        return self.head(h)


def test_zero_dim_tensor_flag_is_part_of_the_layout():
    def loss(m, inp, y):
        _warm_once(m, inp[0], torch.tensor(False))
        return nn.functional.cross_entropy(m(inp[0], torch.tensor(True)), y)

    case = Case(name="flag_0d", build=_seeded(Center), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True, forward_loss=loss)
    assert check_case(case, replace=True).refused is not None  # today: AssertionError, 1.7798 C


# -- 5. second-order and forward-mode differentiation --------------------------------------------
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(x)).mean(1))


def _penalty_functional_vjp(model, inp, y):
    x = inp[0].clone().requires_grad_(True)
    out = model(x)
    _, gx = torch.autograd.functional.vjp(lambda v: model(v).logsumexp(-1).sum(), x, create_graph=True)
    return nn.functional.cross_entropy(out, y) + gx.pow(2).sum() / len(y)


def _penalty_func_grad(model, inp, y):
    x = inp[0].clone()
    out = model(x)
    gx = torch.func.grad(lambda v: model(v).logsumexp(-1).sum())(x)
    return nn.functional.cross_entropy(out, y) + gx.pow(2).sum() / len(y)


def _penalty_forward_ad(model, inp, y):
    import torch.autograd.forward_ad as fwAD

    x = inp[0].clone()
    with fwAD.dual_level():
        out, tangent = fwAD.unpack_dual(model(fwAD.make_dual(x, torch.ones_like(x))))
    return nn.functional.cross_entropy(out, y) + tangent.pow(2).sum() / len(y)


@pytest.mark.parametrize("penalty", [_penalty_functional_vjp, _penalty_func_grad], ids=["functional_vjp", "func_grad"])
def test_graph_building_penalties_are_refused(penalty):
    case = Case(name=penalty.__name__, build=_seeded(Mlp), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True, forward_loss=penalty)
    out = check_case(case, replace=True)
    assert out.refused is not None and "builds a graph" in out.refused, out


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "forward-mode AD through the private model (a tangent penalty, torch.autograd.forward_ad or "
    "torch.func.jvp): the rule layers run on detached weights, so the tangent does not depend on "
    "them and the penalty's weight gradient is silently dropped: the clipped sum is 0.76 of "
    "sum_i ||clipped g_i|| off the float64 reference (the bound holds: 1.0000 C). torch.func.jvp "
    "/ vjp over the private model crash with 'cannot register a hook on a tensor that doesn't "
    "require gradient'. Fix: in Recorder.tap / _tap_tree refuse the batch (graph_building-style) "
    "when a tapped output carries a forward-mode tangent (torch.autograd.forward_ad.unpack_dual("
    "out).tangent is not None) or a functorch level is active, with a message naming forward-mode "
    "AD"))
def test_forward_mode_penalty_is_refused_or_exact():
    case = Case(name="forward_ad", build=_seeded(Mlp), inputs=(_x(),), target=Y, adversarial=(0, 1),
                refuse_ok=True, forward_loss=_penalty_forward_ad)
    check_case(case, replace=True)  # today: AssertionError, sum off by 7.618e-01


# -- 6. legitimate models: accepted ---------------------------------------------------------------
class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, flags=None, temperature=1.0):
        h = torch.tanh(self.fc(x.mean(1)))
        if flags and flags.get("residual"):
            h = h + x.mean(1)
        return self.head(h) / temperature, h.pow(2).mean()  # (logits, an aux the loss ignores)


def test_dict_of_flags_and_unused_aux_output_hold_the_bound():
    case = Case(name="flags_aux", build=_seeded(Flags), inputs=(_x(),), target=Y, adversarial=(0, 1),
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(
                    m(inp[0], flags={"residual": True, "drop": False}, temperature=0.5)[0], y))
    assert check_case(case, replace=True).refused is None


def test_changing_float_argument_reprobes_every_call():
    """Documents the cost: each new temperature is a new layout (about 23x a step on bench BERT)."""
    model = _seeded(Flags)()
    private, opt, _ = _private(model)
    for i in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(private(_x(), temperature=1.0 + 0.1 * i)[0], Y).backward()
        opt.step()
    assert len(private._verified) == 3


def _hf_step(build, step):
    model = build()
    private, opt, _ = _private(model)
    for _ in range(2):
        opt.zero_grad()
        step(private).backward()
        opt.step()


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "logits"])
def test_hf_vit_is_accepted(labels):
    transformers = pytest.importorskip("transformers")
    pix = torch.randn(B, 3, 8, 8, dtype=torch.float64, generator=_gen(2))

    def build():
        cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     num_labels=K)
        torch.manual_seed(0)
        return transformers.ViTForImageClassification(cfg).double()

    _hf_step(build, lambda m: m(pixel_values=pix, labels=Y).loss if labels
             else nn.functional.cross_entropy(m(pixel_values=pix).logits, Y))


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "logits"])
def test_peft_lora_bert_is_accepted(labels):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 50, (B, 8), generator=_gen(3))
    mask = torch.ones_like(ids)
    mask[2:, 6:] = 0

    def build():
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16, num_labels=K,
                                      hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(transformers.BertForSequenceClassification(cfg).double(), peft.LoraConfig(
                r=2, target_modules=["query", "value"], modules_to_save=["classifier"]))

    _hf_step(build, lambda m: m(input_ids=ids, attention_mask=mask, labels=Y).loss if labels
             else nn.functional.cross_entropy(m(input_ids=ids, attention_mask=mask).logits, Y))
