"""Review S9, second pass: attacks on the records probe of commit 4e8cda3 (output record
dimension in any dimension of B entries, aggregates tapped, dataclass arguments walked and other
tensor holders refused, non-tensor values in the layout key, the repeat check and batches of one).
One DP step at noise 0, float64, C = 1: ||Delta|| is the clipped sum's move when one record is
removed (bound C) or replaced (bound 2 C). Open bugs are ``xfail(strict=True)`` with the measured
number and a fix; false refusals are ``xfail(strict=True)`` too (the test asserts acceptance).

Open (most severe first):
- an aggregate output of E entries is tapped by the *current* batch size: the layout, probed at
  B != E, is reused at B == E, the (E,) output counts as per record and is not tapped: 6.12 C on
  replacing a record (bound 2 C);
- records inside a mapping that is not a dict (``collections.UserDict``, Hugging Face
  ``BatchEncoding``): leaves() walks it, _swap() returns it unchanged, so no probe run perturbs
  anything and a detached batch mean is accepted: 2.79 C;
- tensors the hidden-tensor walk misses (5 attribute levels deep, a closure, a functools.partial,
  an attribute of a tensor, a dataclass attribute that is not a field): 2.79 C;
- non-tensor arguments the layout key cannot tell apart (an Enum member, a plain config object,
  numpy.bool_, a function): the flag switched after the probe, 2.39 C;
- state from one forward used only in the next backward, physical batches of one (the repeat check
  compares forward values only, and a batch of one has no group checks): 2.77 C;
- a loss the model computes over the batch's non-ignored tokens (Hugging Face's causal-LM loss):
  whether it mixes records is decided once, from the probed batch's values; a first batch without
  padding, a later one with -100 labels: 2.36 C (the "trigger value in a later batch" the module
  docstring accepts, here in the standard ``outputs.loss`` training loop).
False refusals (permanent for the layout: the refusal is cached under a key without the batch
size): a seq-first classifier's (B, K) logits when the first batch has B == K; a model returning
an (E,) aggregate its loss does not use when the first batch has B == E.
Holding: dict / OrderedDict arguments, 4 levels deep, a frozenset: refused or probed; BERT
``outputs.loss`` (dropout 0.1) and GPT-2 ``outputs.loss`` without padding accepted, with padding
refused; a (logits, hidden) tuple with a rotary table cached in a plain attribute holds the bound.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import BatchMemoryManager, PrivacyEngine, PrivacyError
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


def _sums(model, b):
    return {n: p.grad.double() * b for n, p in model.named_parameters() if p.requires_grad}


def _delta(a, b):
    return flat_norm({n: a[n] - b[n] for n in a})


# -- 1. aggregates tapped by the current batch size ----------------------------------------------
E = 4


class MoEVec(nn.Module):
    """A router over E experts returning its load-balancing term per expert, (E,): not per record."""

    def __init__(self):
        super().__init__()
        self.router, self.e1 = nn.Linear(D, E), nn.Linear(D, K)

    def forward(self, x):
        h = x.mean(1)
        p = torch.softmax(self.router(h), -1)
        return self.e1(h) * p[:, :1], E * p.mean(0) ** 2


def _moe_sums(x, y, warm, aux=1000.0):
    """A refused step at B = 6 (the probe's batch), then one step at B = len(x)."""
    model = _seeded(MoEVec)()
    private, opt, _ = _private(model, b=len(y))
    opt.zero_grad()
    logits, load = private(warm)
    (nn.functional.cross_entropy(logits, Y) + aux * load.sum()).backward()
    with pytest.raises(PrivacyError, match="not per record"):
        opt.step()
    opt.zero_grad()
    logits, load = private(x)
    (nn.functional.cross_entropy(logits, y) + aux * load.sum()).backward()
    opt.step()
    return _sums(model, len(y))


def test_aggregate_with_batch_size_entries_is_tapped():
    warm = torch.randn(B, T, D, generator=_gen(4), dtype=torch.float64)
    x = torch.randn(E, T, D, generator=_gen(5), dtype=torch.float64) * 0.1
    y = Y[:E]
    xr = x.clone()
    xr[0] = 10.0 * _seeded(MoEVec)().router.weight[1].detach().reshape(1, D).expand(T, D)
    try:
        delta = _delta(_moe_sums(x, y, warm), _moe_sums(xr, y, warm))
    except PrivacyError:
        return
    assert delta <= 2.0 + 1e-9, f"record 0 replaced at B = E: {delta:.4f} C"  # today: 6.1204 C


def test_aggregate_control_at_the_probed_batch_size_is_refused():
    model = _seeded(MoEVec)()
    private, opt, _ = _private(model)
    logits, load = private(_x())
    (nn.functional.cross_entropy(logits, Y) + load.sum()).backward()
    with pytest.raises(PrivacyError, match="not per record"):
        opt.step()


# -- 2. records in a mapping that is not a dict --------------------------------------------------
class MappingInput(nn.Module):
    """``forward(batch)`` with ``batch["x"]``, ``batch["feats"]``; the records of ``feats`` are
    mixed through their batch mean (no gradient path: only the probe's perturbation shows it)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, batch):
        x, f = batch["x"], batch["feats"]
        h = torch.tanh(self.fc1(x.mean(1) + f))
        return self.head(h + 3 * f.mean(0, keepdim=True))


def _mapping_case(wrap):
    return Case(name=f"mapping_{wrap.__name__}", build=_seeded(MappingInput), inputs=(_x(), FEATS), target=Y,
                adversarial=(0,), refuse_ok=True,
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(wrap({"x": inp[0], "feats": inp[1]})), y))


def _batch_encoding(d):
    transformers = pytest.importorskip("transformers")
    return transformers.BatchEncoding(d)


@pytest.mark.parametrize("wrap", [dict, collections.OrderedDict], ids=["dict", "OrderedDict"])
def test_records_in_a_dict_argument_are_probed(wrap):
    out = check_case(_mapping_case(wrap), replace=True)
    assert out.refused is not None and "changed when only" in out.refused, out


@pytest.mark.parametrize("wrap", [collections.UserDict, _batch_encoding], ids=["UserDict", "BatchEncoding"])
def test_records_in_a_mapping_that_is_not_a_dict_are_probed(wrap):
    out = check_case(_mapping_case(wrap), replace=True)  # today: AssertionError, 2.7851 x the bound
    assert out.refused is not None, out


# -- 3. tensors the hidden-tensor walk does not see ----------------------------------------------
class _Node:
    def __init__(self, a):
        self.a = a


@dataclasses.dataclass
class _WithDerived:
    x: torch.Tensor

    def __post_init__(self):  # an attribute that is not a field: fields() does not list it
        self.feats = _WithDerived.source


def _deep(f, n):
    for _ in range(n):
        f = _Node(f)
    return f


def _tensor_attr(f):
    t = torch.zeros(1, dtype=torch.float64)
    t.feats = f
    return t


def _derived(f):
    _WithDerived.source = f
    try:
        return _WithDerived(x=torch.zeros(len(f), dtype=torch.float64))
    finally:
        del _WithDerived.source


HOLDERS = {
    "depth4": lambda f: _deep(f, 4),
    "frozenset": lambda f: frozenset([f]),
    "depth5": lambda f: _deep(f, 5),
    "closure": lambda f: (lambda: f),
    "partial": lambda f: functools.partial(torch.clone, f),
    "tensor_attribute": _tensor_attr,
    "dataclass_non_field_attribute": _derived,
}


def _unwrap(ctx):
    if isinstance(ctx, _Node):
        while isinstance(ctx, _Node):
            ctx = ctx.a
        return ctx
    if isinstance(ctx, frozenset):
        return next(iter(ctx))
    if isinstance(ctx, torch.Tensor):
        return ctx.feats
    if isinstance(ctx, _WithDerived):
        return ctx.feats
    return ctx() if callable(ctx) else ctx


class HolderInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, ctx):
        f = _unwrap(ctx)
        h = torch.tanh(self.fc1(x.mean(1) + f))
        return self.head(h + 3 * f.mean(0, keepdim=True))


def _holder_case(name):
    wrap = HOLDERS[name]
    return Case(name=name, build=_seeded(HolderInput), inputs=(_x(), FEATS), target=Y, adversarial=(0,),
                refuse_ok=True,
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(inp[0], wrap(inp[1])), y))


@pytest.mark.parametrize("name", ["depth4", "frozenset"])
def test_hidden_tensors_within_reach_are_refused(name):
    out = check_case(_holder_case(name), replace=True)
    assert out.refused is not None and "cannot reach" in out.refused, out


@pytest.mark.parametrize("name", ["depth5", "closure", "partial", "tensor_attribute",
                                  "dataclass_non_field_attribute"])
def test_hidden_tensors_out_of_reach_are_refused(name):
    out = check_case(_holder_case(name), replace=True)  # today: AssertionError, 2.7851 x the bound
    assert out.refused is not None, out


# -- 4. non-tensor arguments the layout key cannot tell apart ------------------------------------
class Mode(enum.Enum):
    PLAIN = 0
    CENTER = 1


class _Cfg:
    def __init__(self, center):
        self.center = center


def _is_center(v):
    if isinstance(v, Mode):
        return v is Mode.CENTER
    if isinstance(v, _Cfg):
        return v.center
    if callable(v):
        return v() == 1
    return bool(v)


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.head = nn.Linear(D, D), nn.Linear(D, K)

    def forward(self, x, center=False):
        h = self.fc1(x.mean(1))
        if _is_center(center):
            h = h - h.mean(0, keepdim=True)
        return self.head(torch.tanh(h))


FLAGS = {
    "enum": (Mode.PLAIN, Mode.CENTER),
    "plain_object": (_Cfg(False), _Cfg(True)),
    "numpy_bool": (np.bool_(False), np.bool_(True)),
    "function": (lambda: 0, lambda: 1),
}


def _flagged_sums(batches):
    model = _seeded(Flagged)()
    private, opt, _ = _private(model)
    for x, y, kw in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(private(x, **kw), y).backward()
        opt.step()
    return _sums(model, len(y))


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_opaque_non_tensor_argument_is_part_of_the_layout(name):
    off, on = FLAGS[name]
    warm = (torch.randn(B, T, D, generator=_gen(4), dtype=torch.float64), Y, {"center": off})
    x = _x()
    try:
        full = _flagged_sums([warm, (x, Y, {"center": on})])
        other = _flagged_sums([warm, (x[1:], Y[1:], {"center": on})])
    except PrivacyError:
        return
    assert _delta(full, other) <= 1.0 + 1e-9, f"record 0 removed: {_delta(full, other):.4f} C"  # today 2.3929


# -- 5. state used only in the backward, physical batches of one ---------------------------------
class _Carry(torch.autograd.Function):
    """Identity forward; the backward adds a vector that the previous forward left behind."""

    @staticmethod
    def forward(ctx, h, carried):
        ctx.carried = carried
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        return g + ctx.carried, None


class BackwardCarry(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, K)
        self.stat = torch.zeros(D, dtype=torch.float64)  # a plain attribute: no buffer check sees it

    def forward(self, x):
        out = self.head(torch.tanh(_Carry.apply(self.fc(x.mean(1)), self.stat)))
        self.stat = x.detach().mean((0, 1))  # the forward's values never depend on it
        return out


def _carry_sums(x, chunk):
    model = _seeded(BackwardCarry)()
    private, opt, _ = _private(model)
    with BatchMemoryManager(data_loader=DataLoader(TensorDataset(x, Y), batch_size=B),
                            max_physical_batch_size=chunk, optimizer=opt) as physical:
        for xb, yb in physical:
            opt.zero_grad()
            nn.functional.cross_entropy(private(xb), yb).backward()
            opt.step()
    return _sums(model, B)


def test_backward_state_with_physical_batches_of_two_is_refused():
    with pytest.raises(PrivacyError, match="rows are not records|run twice"):
        _carry_sums(_x(), 2)


def test_backward_state_with_physical_batches_of_one():
    x = _x()
    xr = x.clone()
    xr[0] = -x[0]
    try:
        delta = _delta(_carry_sums(x, 1), _carry_sums(xr, 1))
    except PrivacyError:
        return
    assert delta <= 2.0 + 1e-9, f"record 0 replaced: {delta:.4f} C"  # today: 2.7721 C


# -- 6. a token-count loss computed by the model -------------------------------------------------
V, TT = 12, 5


class TinyLM(nn.Module):
    """Hugging Face style: ``forward(input_ids, labels)`` -> (loss, logits), the loss a mean over
    the batch's tokens whose label is not -100 (a batch-wide token count)."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(V, D), nn.Linear(D, D), nn.Linear(D, V)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.fc(self.emb(input_ids))))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
        return loss, logits


def _lm_sums(batches, b):
    model = _seeded(TinyLM, 0.2)()
    private, opt, _ = _private(model, b=b)
    for ids, lab in batches:
        opt.zero_grad()
        private(ids, labels=lab)[0].backward()
        opt.step()
    return _sums(model, b)


def _lm_batches():
    g = _gen(11)
    warm = torch.randint(0, V, (B, TT), generator=g)
    ids = torch.randint(0, V, (B, TT), generator=g)
    ids[1:] = ids[1]
    lab = ids.clone()
    lab[1:, 1:] = -100  # records 1.. have one token, record 0 has TT
    return warm, ids, lab


def test_token_count_loss_with_padding_in_the_probed_batch_is_refused():
    _, ids, lab = _lm_batches()
    with pytest.raises(PrivacyError, match="not per record"):
        _lm_sums([(ids, lab)], B)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "whether an aggregate output mixes records is decided once per layout from the probed batch's "
    "values (_verified caches (None, None) when the first batch has no -100 labels: the token "
    "count is then constant under the probe's perturbations), and a later batch of the same "
    "layout with padding backprops outputs.loss untapped: 2.36 C on removing a record. Fix: tap "
    "every aggregate output of a layout, also when the probe found no mixing, and when a gradient "
    "reaches one re-run the aggregate check (_aggregate_mixing, group probes) on that batch, or "
    "refuse it"))
def test_token_count_loss_with_padding_after_the_probe():
    warm, ids, lab = _lm_batches()
    try:
        full = _lm_sums([(warm, warm.clone()), (ids, lab)], B)
        other = _lm_sums([(warm, warm.clone()), (ids[1:], lab[1:])], B - 1)
    except PrivacyError:
        return
    assert _delta(full, other) <= 1.0 + 1e-9, f"record 0 removed: {_delta(full, other):.4f} C"  # today 2.3551


# -- 7. false refusals ---------------------------------------------------------------------------
class SeqFirst(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, k)

    def forward(self, x):  # (T, B, D) -> (B, K)
        return self.head(torch.tanh(self.fc(x)).mean(0))


def _seq_first_case(k):
    y = torch.randint(0, k, (B,), generator=_gen(9))
    return Case(name=f"seq_first_K{k}", build=_seeded(SeqFirst, k), inputs=(_x().transpose(0, 1).contiguous(),),
                target=y, record_dim=1, batch_first=False, adversarial=(0, 1), refuse_ok=True)


def test_seq_first_logits_with_k_other_than_b_hold():
    out = check_case(_seq_first_case(B + 1), replace=True)
    assert out.refused is None, out


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "false refusal: under batch_first=False output_record_dim takes record_dim's dim 1 whenever it "
    "has B entries, so the (B, K) logits of a seq-first classifier with K == B are read by class "
    "(check 1: 'fc row(s) [1, 3, 5] reach the output of records [0, 2, 4]'); the verdict is "
    "cached under a key without the batch size, so every later batch of the layout is refused "
    "too. Fix: when more than one dimension of an output has B entries, find the record dim "
    "empirically (the dimension along which the group cotangents of check 1 stay within the "
    "group, tried for each candidate), or probe again at the next batch size that tells them "
    "apart before caching a refusal"))
def test_seq_first_logits_with_k_equal_to_b_are_accepted():
    out = check_case(_seq_first_case(B), replace=True)
    assert out.refused is None, out


@pytest.mark.xfail(strict=True, raises=PrivacyError, reason=(
    "false refusal: a model returning an (E,) aggregate (router load) that its loss does not use "
    "is refused when the first batch has B == E (the aggregate is taken as per record and check 1 "
    "sees it reach every row), and the refusal is cached for the layout. Fix: the same as for "
    "K == B (a record dim found empirically, or an undecided verdict left uncached), and classify "
    "outputs that reach every row as aggregates, tapped, not as refusals"))
def test_unused_aggregate_with_b_entries_is_accepted():
    model = _seeded(MoEVec)()
    private, opt, _ = _private(model, b=E)
    logits, _ = private(_x()[:E])
    nn.functional.cross_entropy(logits, Y[:E]).backward()
    opt.step()


# -- 8. holding: Hugging Face losses, tuples, cached tables, dropout -----------------------------
class RotaryTuple(nn.Module):
    """A cos table cached in a plain attribute on the first call; returns (logits, hidden)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.fc, self.head, self.drop = nn.Linear(D, D), nn.Linear(D, K), nn.Dropout(p)
        self.cache = None

    def forward(self, x):
        if self.cache is None or self.cache.shape[0] < x.shape[1]:
            pos = torch.arange(x.shape[1], dtype=torch.float64)[:, None]
            self.cache = torch.cos(pos * torch.arange(D, dtype=torch.float64) / D)
        h = self.drop(torch.tanh(self.fc(x + self.cache[: x.shape[1]])))
        return self.head(h.mean(1)), h


def test_cached_table_and_tuple_output_hold_the_bound():
    case = Case(name="rotary_tuple", build=_seeded(RotaryTuple), inputs=(_x(),), target=Y, adversarial=(0, 1),
                forward_loss=lambda m, inp, y: nn.functional.cross_entropy(m(*inp)[0], y))
    assert check_case(case, replace=True).refused is None


def test_dropout_model_with_tuple_output_is_accepted():
    model = _seeded(RotaryTuple, 0.3)()
    private, opt, _ = _private(model)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(private(_x())[0], Y).backward()
        opt.step()


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "bert":
            cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=16, num_labels=K,
                                          hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
            return transformers.BertForSequenceClassification(cfg).double()
        cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                      eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).double()


IDS = torch.randint(0, 50, (B, 8), generator=_gen(3))
MASK = torch.ones_like(IDS)
MASK[2:, 6:] = 0


def test_hf_sequence_classifier_outputs_loss_is_accepted():
    model = _hf("bert")
    private, opt, _ = _private(model)
    for _ in range(2):
        opt.zero_grad()
        private(input_ids=IDS, attention_mask=MASK, labels=Y).loss.backward()
        opt.step()


@pytest.mark.parametrize("padding", [False, True])
def test_hf_causal_lm_outputs_loss(padding):
    """Without padding the mean over B*T tokens is per record (accepted); with -100 labels the
    token count mixes the records of the batch (refused)."""
    model = _hf("gpt2")
    private, opt, _ = _private(model)
    labels = IDS.masked_fill(MASK == 0, -100) if padding else IDS
    opt.zero_grad()
    private(input_ids=IDS, labels=labels, use_cache=False).loss.backward()
    if padding:
        with pytest.raises(PrivacyError, match="not per record"):
            opt.step()
    else:
        opt.step()
