"""The torch.func path and parameter ownership (issue 14, item 7): modules that return tuples,
take keyword arguments, run unrolled recurrent cells, keep parameters in ParameterDicts (peft
LoRA on an nn.Embedding) or on the root module get exactly the float64 per-record reference;
a parameter used outside its module's calls is refused at the step, naming it, with nothing
changed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ppml_fast.privacy import DPOptimizer, PrivateModule, UnsupportedModuleError, fallback
from ppml_fast.privacy.ownership import UnownedParameterError

MODES = ["ghost", "materialize"]
C = 0.5


def reference(model, inputs, y, kwargs=None):
    """Per-record gradients of the per-record cross-entropy, record by record (a batch of one,
    torch.autograd on the float64 model), clipped to C (Abadi et al. 2016, Alg. 1) and summed:
    name -> tensor; and the per-record norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    kwargs = kwargs or {}
    per = []
    for i in range(y.shape[0]):
        out = model(*(x[i:i + 1] for x in inputs), **{k: v[i:i + 1] for k, v in kwargs.items()})
        loss = nn.functional.cross_entropy(out, y[i:i + 1], reduction="sum")
        per.append(torch.autograd.grad(loss, [p for _, p in named], allow_unused=True))
    g = {n: torch.stack([torch.zeros_like(p) if r[k] is None else r[k] for r in per])
         for k, (n, p) in enumerate(named)}
    total = sum(t.flatten(1).pow(2).sum(1) for t in g.values()).sqrt()
    f = torch.clamp(C / (total + 1e-6), max=1.0)
    return {n: torch.einsum("b,b...->...", f, t) for n, t in g.items()}, total


def check(model, inputs, y, mode, kwargs=None, min_norm=1e-3):
    """Clipped sums of a wrapped deep copy of ``model`` equal the reference, for every trainable
    parameter (one that got no clipped sum counts as zero)."""
    ref = copy.deepcopy(model)
    private = PrivateModule(model, grad_sample_mode=mode, loss_reduction="mean")
    nn.functional.cross_entropy(private(*inputs, **(kwargs or {})), y).backward()
    sums, seen = private.clipped_sums(max_grad_norm=C)
    want, total = reference(ref, inputs, y, kwargs)
    assert seen == y.shape[0]
    assert bool((total > C).any()), "the test should clip some records"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert float(want[n].norm()) > min_norm, f"{n}: the reference gradient should not vanish"
        got = sums.get(p, torch.zeros_like(p))
        torch.testing.assert_close(got, want[n], rtol=1e-8, atol=1e-10, msg=n)
    return private


# -- (a) a custom layer returning a tuple --------------------------------------------------------
class TupleLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.v = nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = torch.tanh(x @ self.w)
        return h, {"score": (h * self.v).sum(-1), "ids": x.argmax(-1)}, (h, None)


class TupleNet(nn.Module):
    def __init__(self, d=5, k=3):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layer = TupleLayer(d)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        h, extra, (again, _) = self.layer(self.inp(x))
        return self.head(h + 0.5 * again) * torch.tanh(extra["score"]).unsqueeze(-1)


@pytest.mark.parametrize("mode", MODES)
def test_tuple_output(mode):
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64) * 3, torch.randint(0, 3, (6,))
    check(TupleNet().double(), (x,), y, mode)


# -- (b) keyword arguments -----------------------------------------------------------------------
class KwLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x, scale=None, shift=0.0, mask=None):
        h = x @ self.w
        if scale is not None:
            h = h * scale
        if mask is not None:
            h = h.masked_fill(~mask, 0.0)
        return h + shift


class KwNet(nn.Module):
    def __init__(self, d=4, k=3):
        super().__init__()
        self.layer = KwLayer(d)
        self.bias = nn.Parameter(torch.randn(d))  # shared (not per-record) keyword input
        self.head = nn.Linear(d, k)

    def forward(self, x, scale):
        h = self.layer(x, scale=scale, shift=torch.tanh(self.bias), mask=x > -1.0)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("mode", MODES)
def test_keyword_arguments(mode):
    torch.manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64) * 2
    scale = torch.rand(6, 1, dtype=torch.float64) * 4 + 0.1
    y = torch.randint(0, 3, (6,))
    check(KwNet().double(), (x, scale), y, mode)


# -- (c) parameters outside their module: the root's own (supported) -----------------------------
class RootParam(nn.Module):
    def __init__(self, d=4, k=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.gain = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, k)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) * self.gain)


@pytest.mark.parametrize("mode", MODES)
def test_root_bare_parameter(mode):
    torch.manual_seed(2)
    x, y = torch.randn(7, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (7,))
    check(RootParam().double(), (x,), y, mode)


@pytest.mark.parametrize("mode", MODES)
def test_tied_weight_between_modules(mode):
    torch.manual_seed(3)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t):
            return self.out(torch.tanh(self.emb(t)).mean(1))

    t, y = torch.randint(0, 6, (5, 3)), torch.randint(0, 6, (5,))
    check(Tied().double(), (t,), y, mode)


# -- (c) parameters outside their module: a parent reads a child's weight (refused) --------------
class Leaky(nn.Module):
    def __init__(self, d=4, k=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, k)
        self.leak = True

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.leak:
            h = h + x @ self.fc.weight.T
        return self.head(h)


@pytest.mark.parametrize("mode", MODES)
def test_parent_using_child_weight_is_refused(mode):
    torch.manual_seed(4)
    model = Leaky().double()
    private = PrivateModule(model, grad_sample_mode=mode)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(private(x), y).backward()
    assert model.fc.weight.grad is None or not bool(model.fc.weight.grad.any())  # nothing unclipped
    with pytest.raises(UnownedParameterError, match=r"fc\.weight"):
        private.clipped_sums(max_grad_norm=C)
    assert private.pending_batches() == 1  # nothing forgotten
    private.discard()
    model.leak = False  # the same model used through its modules only: fine again
    nn.functional.cross_entropy(private(x), y).backward()
    private.clipped_sums(max_grad_norm=C)


@pytest.mark.parametrize("mode", MODES)
def test_refused_step_changes_nothing(mode):
    torch.manual_seed(5)
    model = Leaky().double()
    model.leak = False
    private = PrivateModule(model, grad_sample_mode=mode)
    opt = DPOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), module=private,
                      noise_multiplier=1.0, max_grad_norm=C, expected_batch_size=6.0, seed=0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(private(x), y).backward()
    opt.step()  # a legitimate step: Adam has state now
    opt.zero_grad()
    model.leak = True
    nn.functional.cross_entropy(private(x), y).backward()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.original_optimizer.state_dict())
    offset, steps = opt.offset, opt.steps
    with pytest.raises(UnownedParameterError, match=r"fc\.weight"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n]), n
    after = opt.original_optimizer.state_dict()
    for k, s in state["state"].items():
        for key, v in s.items():
            now = torch.as_tensor(after["state"][k][key])
            assert torch.equal(now, torch.as_tensor(v)), (k, key)
    assert (opt.offset, opt.steps) == (offset, steps)


def test_watch_hooks_removed_and_deep_copies_work():
    torch.manual_seed(6)
    model = Leaky().double()
    private = PrivateModule(model)
    twin = copy.deepcopy(private)  # its own watch, on its own parameters
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(twin(x), y).backward()
    with pytest.raises(UnownedParameterError, match=r"fc\.weight"):
        twin.clipped_sums(max_grad_norm=C)
    assert not private.parameter_watch.flagged
    inner = private.remove_hooks()
    nn.functional.cross_entropy(inner(x), y).backward()  # a plain model again: plain gradients
    assert inner.fc.weight.grad is not None and bool(inner.fc.weight.grad.any())


# -- (d) unrolled recurrent cells ----------------------------------------------------------------
class Unrolled(nn.Module):
    def __init__(self, cell, d=3, h=5, k=3):
        super().__init__()
        self.kind = cell
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[cell](d, h)
        self.head = nn.Linear(h, k)

    def forward(self, x):  # x: (B, T, d)
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if self.kind == "lstm" else state
        return self.head(h)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_unrolled_cell(cell, mode):
    torch.manual_seed(7)
    x, y = torch.randn(6, 4, 3, dtype=torch.float64) * 2, torch.randint(0, 3, (6,))
    check(Unrolled(cell).double(), (x,), y, mode)


# -- (e) peft LoRA on an nn.Embedding (parameters in a ParameterDict) ----------------------------
class EmbNet(nn.Module):
    def __init__(self, v=10, d=6, k=3):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.head = nn.Linear(d, k)

    def forward(self, t):
        return self.head(torch.tanh(self.emb(t)).mean(1))


@pytest.mark.parametrize("mode", MODES)
def test_peft_lora_embedding(mode):
    import peft
    torch.manual_seed(8)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb"])
    model = peft.inject_adapter_in_model(cfg, EmbNet().double())
    lora = model.emb
    assert isinstance(lora.lora_embedding_A, nn.ParameterDict)
    with torch.no_grad():  # peft starts A at zero (B's gradient would vanish): a trained adapter
        for p in list(lora.lora_embedding_A.values()) + list(lora.lora_embedding_B.values()):
            p.normal_()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    t, y = torch.randint(0, 10, (6, 4)), torch.randint(0, 3, (6,))
    check(model, (t,), y, mode)


# -- the fallback's own refusals -----------------------------------------------------------------
class Centering(nn.Module):
    """Mixes the records of a batch: no per-record gradient exists."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return (x - x.mean(0)) * self.w


class SharedRows(nn.Module):
    """Takes a shared (d, d) matrix as input; with d equal to the batch size its rows look per
    record."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x, m):
        return (x @ m) * self.w


class RefusedNet(nn.Module):
    def __init__(self, inner, d=4):
        super().__init__()
        self.inner = inner
        self.m = torch.randn(d, d, dtype=torch.float64)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inner(x, self.m) if isinstance(self.inner, SharedRows) else self.inner(x)
        return self.head(h)


@pytest.mark.parametrize("inner", [Centering, SharedRows])
def test_rerun_that_does_not_reproduce_is_refused(inner):
    torch.manual_seed(9)
    model = RefusedNet(inner(4)).double()
    private = PrivateModule(model, grad_sample_mode="materialize")
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModuleError):  # at the forward, or at the step
        nn.functional.cross_entropy(private(x), y).backward()
        private.clipped_sums(max_grad_norm=C)
    # the fallback itself, on the call as recorded: refused, naming the module
    mod = inner(4).double()
    args = (x, model.m) if inner is SharedRows else (x,)
    out = mod(*args).detach()
    rerun = fallback.Rerun(args, {}, [out], 4, "inner (X)")
    with pytest.raises(UnsupportedModuleError, match=r"inner \(X\).*(does not reproduce|failed)"):
        fallback.per_sample_grads(mod, dict(mod.named_parameters()), rerun, [torch.randn_like(out)])


def test_unknown_output_container_is_refused():
    class Box:
        def __init__(self, t):
            self.t = t

    class Boxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return Box(x * self.w)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.boxed = Boxed()

        def forward(self, x):
            return self.boxed(x).t

    private = PrivateModule(Net())
    with pytest.raises(UnsupportedModuleError, match="boxed"):
        private(torch.randn(3, 4)).sum().backward()


def test_parameter_unfrozen_later_is_watched_and_penalties_refused():
    torch.manual_seed(10)
    model = RootParam().double()
    model.fc.weight.requires_grad_(False)
    private = PrivateModule(model)
    model.fc.weight.requires_grad_(True)  # unfrozen after wrapping: watched from the next forward
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss = nn.functional.cross_entropy(private(x), y) + 0.1 * model.fc.weight.pow(2).sum()
    loss.backward()
    with pytest.raises(UnownedParameterError, match=r"fc\.weight"):
        private.clipped_sums(max_grad_norm=C)


def test_complex_output_refused():
    class Complexish(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.polar(x.abs() + self.w.abs(), x), x * self.w

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Complexish()

        def forward(self, x):
            z, r = self.c(x)
            return z.abs() + r

    private = PrivateModule(Net())
    with pytest.raises(UnsupportedModuleError, match=r"\bc \(Complexish\).*complex"):
        private(torch.randn(3, 4)).sum().backward()


def test_nonfinite_output_is_left_to_the_nonfinite_check():
    """A record whose output is not finite is the non-finite check's (raise or drop), not a
    rerun mismatch."""
    torch.manual_seed(11)
    model = RootParam().double()
    private = PrivateModule(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    x[2, 0] = float("nan")
    nn.functional.cross_entropy(private(x), y).backward()
    sums, seen = private.clipped_sums(max_grad_norm=C, nonfinite="drop")
    assert seen == 5 and all(bool(torch.isfinite(s).all()) for s in sums.values())


def test_unrolled_lstm_float32_matches_float64_reference():
    torch.manual_seed(12)
    ref = Unrolled("lstm").double()
    model = copy.deepcopy(ref).float()
    private = PrivateModule(model)
    x, y = torch.randn(6, 5, 3, dtype=torch.float64) * 2, torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(private(x.float()), y).backward()
    sums, _ = private.clipped_sums(max_grad_norm=C)
    want, _ = reference(ref, (x,), y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p].double(), want[n], rtol=2e-4, atol=2e-5, msg=n)
