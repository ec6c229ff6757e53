"""Review S7 (attacker's view) of the tap-cropped convolution paths (conv_taps / conv_fast /
conv_book): end to end through make_private, against the float64 per-record reference of
``tests/privacy/sensitivity/_harness.py`` (clipped sum = reference, one record moves it by <= C).

Geometries chosen so that a wrongly cropped tap would read real input: stride, dilation,
asymmetric / 'same' / 'valid' padding, non-zero padding modes (the module pads first: nothing to
crop), kernels larger than the input, 1-D / 3-D, channels-last and transposed (non-contiguous)
inputs, groups (old path), transposed convolutions (torch.func fallback); every book-keeping
method (dense / per-tap / native) with the ghost path forced, the materialise path, float32 /
bfloat16 / float16, records crafted so that their Gram terms cancel (flagged: must stay <= C on
every book-keeping method), per-layer clipping and nonfinite="drop"."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ppml_fast.privacy.per_sample import Captured, conv, conv_book, conv_fast, conv_taps, make_rules
from tests.privacy.sensitivity._harness import (Case, check_case, clip_and_sum, engine_sums, flat_norm,
                                                lowered, per_record_grads, select)

B, K = 4, 3

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ConvNet(nn.Module):
    """``pre`` (a layout change: channels-last, a transposed view) -> conv -> tanh -> Linear."""

    def __init__(self, make_conv, in_shape, pre=None):
        super().__init__()
        self.conv = make_conv()
        self.pre = pre
        with torch.no_grad():
            feats = self.conv(self._pre(torch.zeros((1,) + tuple(in_shape)))).numel()
        self.head = nn.Linear(feats, K)

    def _pre(self, x):
        if self.pre == "channels_last":
            return x.contiguous(memory_format=torch.channels_last)
        if self.pre == "transposed":  # a non-contiguous view (spatial dims swapped)
            return x.transpose(-1, -2)
        return x

    def forward(self, x):
        return self.head(torch.tanh(self.conv(self._pre(x))).flatten(1))


# name -> (conv factory, input shape (C, *S), pre)
GEOMETRIES = {
    "centre_only_1x1": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 1, 1), None),
    "stride2_on_2x2": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 2), None),
    "dilated_rect": (lambda: nn.Conv2d(2, 3, (3, 5), padding=(2, 0), dilation=(2, 1)), (2, 3, 7), None),
    "same_even_kernel": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 3, 3), None),
    "same_dilated_1d": (lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=3), (2, 5), None),
    "valid": (lambda: nn.Conv2d(2, 3, 3, padding="valid", stride=2), (2, 5, 4), None),
    "reflect": (lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="reflect"), (2, 3, 3), None),
    "replicate_big": (lambda: nn.Conv2d(2, 3, 5, stride=2, padding=3, padding_mode="replicate"), (2, 1, 2), None),
    "circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 2, 2), None),
    "reflect_same_1d": (lambda: nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 4), None),
    "kernel_gt_input_1d": (lambda: nn.Conv1d(2, 3, 7, padding=5), (2, 2), None),
    "kernel_gt_input_strided": (lambda: nn.Conv2d(2, 3, 5, stride=3, padding=4), (2, 2, 2), None),
    "pad_one_side_dim": (lambda: nn.Conv2d(2, 3, (1, 5), padding=(0, 3)), (2, 4, 1), None),
    "conv3d_mixed": (lambda: nn.Conv3d(2, 2, 3, padding=1, stride=(1, 2, 1)), (2, 1, 3, 2), None),
    "conv3d_dilated": (lambda: nn.Conv3d(1, 2, (2, 3, 1), padding=(2, 2, 0), dilation=(3, 2, 1)), (1, 2, 2, 3), None),
    "no_bias_odd": (lambda: nn.Conv2d(3, 2, (3, 2), stride=(2, 3), padding=(1, 2), bias=False), (3, 5, 3), None),
    "channels_last": (lambda: nn.Conv2d(4, 3, 3, padding=1), (4, 3, 3), "channels_last"),
    "transposed_view": (lambda: nn.Conv2d(2, 3, 3, stride=(1, 2), padding=1), (2, 3, 5), "transposed"),
    # taps 0 and 2 read the input, tap 1 never does (inside the box: kept, an exact zero)
    "interior_inactive_tap": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=2), (2, 1, 1), None),
    "no_tap_reads": (lambda: nn.Conv2d(2, 3, 1, stride=3, padding=1), (2, 1, 1), None),
    "groups2": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), (4, 2, 2), None),
    "conv_transpose": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 2, 2), None),
}


def _case(name, dtype=torch.float64, mode="ghost_forced", **kw):
    make_conv, in_shape, pre = GEOMETRIES[name]

    def build():
        torch.manual_seed(0)
        return ConvNet(make_conv, in_shape, pre).double()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B,) + tuple(in_shape), generator=gen, dtype=torch.float64)
    x[1] *= 50.0  # a large record (clipped hard) next to small ones
    y = torch.arange(B) % K
    forced = mode == "ghost_forced"
    return Case(name=f"{name}-{mode}-{dtype}", build=build, inputs=(x,), target=y,
                mode="materialize" if mode == "materialize" else "ghost",
                rules="ghost" if forced else None, dtype=dtype, **kw)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometries_ghost_forced_and_materialize(name):
    for mode in ("ghost_forced", "materialize"):
        check_case(_case(name, mode=mode))


CROP_AND_PAD = ["centre_only_1x1", "stride2_on_2x2", "dilated_rect", "same_even_kernel", "reflect",
                "kernel_gt_input_strided", "conv3d_dilated", "channels_last", "interior_inactive_tap"]


@pytest.mark.parametrize("book", ["dense", "taps", "native"])
def test_every_book_keeping_method(book, monkeypatch):
    monkeypatch.setattr(conv_book, "MODE", book)
    for name in CROP_AND_PAD:
        check_case(_case(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision(dtype):
    for name in ("stride2_on_2x2", "same_even_kernel", "replicate_big", "conv3d_mixed"):
        check_case(_case(name, dtype=dtype))
        check_case(_case(name, dtype=dtype, mode="materialize"))


def test_per_layer_clipping():
    for name in ("dilated_rect", "kernel_gt_input_1d", "no_bias_odd"):
        case = _case(name, clipping="per_layer")
        n = len([p for p in case.build().parameters()])
        check_case(case.with_(C=[0.5 + 0.25 * i for i in range(n)]))
        check_case(case.with_(clipping="automatic"))


def test_plan_crops_only_taps_that_never_read_input():
    """Brute force over small 1-D geometries: a tap is kept iff some output reads a real input
    through it (dimensions are independent), and the per-tap boxes count exactly the (tap,
    position) pairs that read real input."""
    for size in range(1, 6):
        for k in range(1, 6):
            for st in range(1, 4):
                for dil in range(1, 3):
                    for lo in range(0, 5):
                        for hi in range(0, 5):
                            out = (size + lo + hi - dil * (k - 1) - 1) // st + 1
                            if out <= 0:
                                continue
                            p = conv_taps.plan((size,), (out,), (k,), (st,), (dil,), ((lo, hi),))
                            reads = [[0 <= o * st + t * dil - lo < size for o in range(out)]
                                     for t in range(k)]
                            active = [t for t in range(k) if any(reads[t])]
                            if not active:
                                assert p.taps == 0
                                continue
                            assert (p.k0[0], p.kernel[0]) == (active[0], active[-1] - active[0] + 1)
                            pairs = sum(sum(r) for r in reads)
                            assert conv_book.boxes(p)[1] == pairs


# -- cancelling records (the Gram bound) on every book-keeping method --------------------------
class MaskedConv(nn.Module):
    """3x3 convolution (padding 1) on 6x6 maps, summed over a fixed pair of positions s, t: the
    output gradient is the same vector at s and t (0 elsewhere), so a record whose windows at s
    and t are M r + a and -M r + a has a small gradient and Gram terms of size M^2."""

    S, T = (1, 1), (4, 4)

    def __init__(self, cin=2):
        super().__init__()
        self.conv = nn.Conv2d(cin, 4, 3, padding=1)
        mask = torch.zeros(6, 6)
        mask[self.S], mask[self.T] = 1.0, 1.0
        self.register_buffer("mask", mask)
        self.head = nn.Linear(4, K)

    def forward(self, x):
        return self.head((self.conv(x) * self.mask).sum((-1, -2)))


def _cancelling_inputs(M):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, 2, 6, 6, generator=gen, dtype=torch.float64)
    # record 2: M at s's centre pixel (channel 0), -M at t's: windows u_s = M e + a_s,
    # u_t = -M e + a_t; the M parts cancel in the gradient g (u_s + u_t)^T, not in the Gram
    x[2, 0, MaskedConv.S[0], MaskedConv.S[1]] = M
    x[2, 0, MaskedConv.T[0], MaskedConv.T[1]] = -M
    return x


@pytest.mark.parametrize("book", ["dense", "taps", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cancelling_record_every_book_keeping(book, dtype, monkeypatch):
    monkeypatch.setattr(conv_book, "MODE", book)
    M = 2.0**20 if dtype == torch.float32 else 2.0**40

    def build():
        torch.manual_seed(0)
        return MaskedConv().double()

    case = Case(name=f"cancel-{book}", build=build, inputs=(_cancelling_inputs(M),),
                target=torch.arange(B) % K, rules="ghost", dtype=dtype, kappa=M, adversarial=(2,))
    check_case(case, replace=True)


@pytest.mark.parametrize("book", ["dense", "taps", "native"])
def test_cancelling_record_is_flagged_per_layer_roles(book, monkeypatch):
    """The rule directly: the cancelling record is flagged on the uncropped 6x6 geometry (whose
    auto book-keeping is the native call) and each role's clipped sum (per-layer clipping) moves
    by <= its factor times its norm when the record is dropped."""
    monkeypatch.setattr(conv_book, "MODE", book)
    x = _cancelling_inputs(2.0**20).float()
    gen = torch.Generator().manual_seed(12)
    w, b = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, generator=gen)
    g = torch.zeros(B, 4, 6, 6)
    v = torch.randn(B, 4, generator=gen)
    g[:, :, 1, 1], g[:, :, 4, 4] = v, v
    cap = Captured("conv2d", x, {"weight": w, "bias": b}, dict(padding=1))
    rule = make_rules("ghost")["conv2d"]
    norms, state = rule.norms_sq(cap, g)
    assert conv_fast.FLAGGED in state and 2 in state[conv_fast.FLAGGED][0].tolist()
    geo = conv._Geometry(2, tuple(w.shape), cap.kwargs)
    plan = conv_fast.plan_for(geo, x, g)
    assert not plan.cropped
    for role, C in (("weight", 1.0), ("bias", 0.5)):
        f = (C / (norms[role].double().sqrt() + 1e-6)).clamp(max=1.0).float()
        sub = Captured("conv2d", x, {role: cap.params[role]}, cap.kwargs)
        got = rule.clipped_sum(sub, g, f, state)[role].double()
        f0 = f.clone()
        f0[2] = 0
        drop = rule.clipped_sum(sub, g, f0, state)[role].double()
        assert float((got - drop).norm()) <= C * (1 + 1e-4), (role, float((got - drop).norm()))


def test_nonfinite_record_dropped_through_a_cropped_conv():
    def build():
        torch.manual_seed(0)
        return ConvNet(*GEOMETRIES["stride2_on_2x2"][:2]).double()

    x = torch.randn(B, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1, 0, 0, 0] = float("inf")
    y = torch.arange(B) % K
    for mode, rules in (("ghost", "ghost"), ("materialize", None)):
        case = Case(name="drop", build=build, inputs=(x,), target=y, mode=mode, rules=rules,
                    make={"nonfinite": "drop"})
        model64 = build()
        got = engine_sums(case, lowered(case, model64), (x,), y)
        keep = [0, 2, 3]
        xk, yk = select(case, (x,), y, keep)
        want, _ = clip_and_sum(case, per_record_grads(case, model64, xk, yk))
        assert flat_norm({n: got[n] - want[n] for n in want}) <= 1e-9, mode


def test_batch_of_zero_records_through_the_fast_paths():
    rule = make_rules()["conv2d"]
    for mode in ("ghost", "materialize"):
        x = torch.zeros(0, 2, 1, 1)
        w = torch.randn(3, 2, 3, 3)
        cap = Captured("conv2d", x, {"weight": w}, dict(padding=1))
        g = torch.zeros(0, 3, 1, 1)
        norms, state = rule.norms_sq(cap, g, mode=mode)
        assert norms["weight"].shape == (0,)
        out = rule.clipped_sum(cap, g, torch.zeros(0), state)["weight"]
        assert out.shape == w.shape and not bool(out.any())


def test_per_sample_weights_of_cropped_geometries_match_the_original_path(monkeypatch):
    """Shared parameters go through per_sample(): the cropped paths' per-sample weights equal
    the original im2col path's (float64), on geometries with dilation, stride and asymmetric
    padding."""
    gen = torch.Generator().manual_seed(13)
    rule = make_rules()["conv2d"]
    for xs, ws, kw in [((3, 2, 1, 3), (3, 2, 3, 3), dict(padding=(1, 2), dilation=(1, 2))),
                       ((3, 2, 4, 2), (2, 2, 4, 3), dict(padding="same")),
                       ((3, 2, 2, 2), (2, 2, 5, 5), dict(stride=3, padding=4))]:
        x = torch.randn(xs, generator=gen, dtype=torch.float64)
        w = torch.randn(ws, generator=gen, dtype=torch.float64)
        g = torch.randn(torch.nn.functional.conv2d(x, w, **kw).shape, generator=gen, dtype=torch.float64)
        cap = Captured("conv2d", x, {"weight": w}, kw)
        monkeypatch.setattr(conv_fast, "FAST", True)
        fast = rule.per_sample(cap, g)["weight"]
        monkeypatch.setattr(conv_fast, "FAST", False)
        slow = rule.per_sample(cap, g)["weight"]
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
        assert math.isclose(float(fast.norm()), float(slow.norm()), rel_tol=1e-12)


class SharedConv(nn.Module):
    """One Conv2d called on a 1x1 map (cropped to its centre tap) and on a 3x3 map (not
    cropped): a shared parameter, materialised through ``per_sample`` for both calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 + 18, K)

    def forward(self, x):
        small = self.conv(x[:, :, :1, :1])
        big = self.conv(torch.tanh(x))
        return self.head(torch.cat([small.flatten(1), big.flatten(1)], 1))


def test_shared_conv_on_cropped_and_uncropped_maps():
    def build():
        torch.manual_seed(0)
        return SharedConv().double()

    x = torch.randn(B, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x[3] *= 30.0
    for mode, rules in (("ghost", "ghost"), ("materialize", None)):
        check_case(Case(name=f"shared-{mode}", build=build, inputs=(x,), target=torch.arange(B) % K,
                        mode=mode, rules=rules))


class ScaledConv(nn.Conv2d):
    """Overrides ``_conv_forward`` (not ``forward``): e.g. weight standardisation / scaling."""

    def _conv_forward(self, x, w, b):
        return super()._conv_forward(x, w * 3.0, b)


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ScaledConv(2, 3, 3, padding=1)
        self.head = nn.Linear(27, K)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_conv_subclass_overriding_conv_forward_is_not_treated_as_stock():
    """BREAK (pre-existing, layers._match; not the tap-cropping commit): a Conv2d subclass that
    overrides ``_conv_forward`` keeps the stock ``forward``, so it gets the conv rule, which
    computes the gradient of a plain convolution on the captured input: the clipped sum is off
    the per-record reference by ~20% (sensitivity still holds: the rule clips what it sums).
    Fix: in ``layers._match`` treat a class as stock only if it also keeps the base class's
    ``_conv_forward`` (every method the functional forward calls), else torch.func."""

    def build():
        torch.manual_seed(0)
        return ScaledNet().double()

    x = torch.randn(B, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    check_case(Case(name="scaled_conv_forward", build=build, inputs=(x,), target=torch.arange(B) % K))
