"""Auditing DP-SGD on digits: with the noise removed the audit refutes the accountant's claim;
the correct DP step stays below it across seeds; the canary machinery does what it says.

Settings were chosen so that a run takes well under a second; the expected margins are stated
where they are asserted (one-run bounds saturate at log(q / (1 - q)) with q = (0.05/16)^(1/r)
for r right guesses: 4.2 for r = 400)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("sklearn")

from ppml_fast.audit import (  # noqa: E402
    DiracCanaries,
    DPSGDConfig,
    audit_digits,
    audit_dp_sgd,
    digits_mlp,
    input_canaries,
)
from ppml_fast.datasets import digits  # noqa: E402
from ppml_fast.privacy.optimizer import DPOptimizer  # noqa: E402


class NoNoiseDPOptimizer(DPOptimizer):
    """The bug the audit must catch: the noise stage does nothing, the accountant still counts
    the noise multiplier."""

    def add_noise(self, grads):
        pass


@pytest.fixture(scope="module")
def small_digits():
    train, _ = digits(seed=0)
    x, y = train.tensors
    return TensorDataset(x[:300], y[:300])


def test_noise_removed_is_flagged_dirac():
    """sigma 1, 3 epochs: claimed 3.12 (RDP). Without noise every included canary that joined
    a batch (95% of them) stands out: 400 of 400 "in" guesses right -> 4.08."""
    got = audit_digits(noise_multiplier=1.0, epochs=3, canaries=1000, seed=0,
                       dp_optimizer_class=NoNoiseDPOptimizer)
    assert got.flagged
    assert got.epsilon_lower_bound > got.epsilon_claimed + 0.5
    assert got.details["optimizer_class"] == "NoNoiseDPOptimizer"


@pytest.mark.parametrize("seed", range(3))
def test_correct_dp_sgd_stays_below_claim(seed):
    got = audit_digits(noise_multiplier=1.0, epochs=3, canaries=1000, seed=seed)
    assert not got.flagged
    assert 0 <= got.epsilon_lower_bound < got.epsilon_claimed
    assert got.counts["canaries"] == 1000 and got.details["steps"] == 69
    assert got.epsilon_claimed == pytest.approx(3.1214, abs=1e-3)  # RDP, q = 1/23, 69 steps


def test_final_model_observation():
    """Only the final model: weaker (0.9 with the noise removed), so a larger sigma (claim 0.6)."""
    broken = audit_digits(noise_multiplier=4.0, epochs=3, observe="model", dp_optimizer_class=NoNoiseDPOptimizer)
    assert broken.flagged and broken.details["observe"] == "model"
    correct = audit_digits(noise_multiplier=4.0, epochs=3, observe="model")
    assert not correct.flagged


@pytest.mark.parametrize("kind", ["ood", "mislabelled"])
def test_input_canaries(small_digits, kind):
    """300 digits + 100 canaries, lr 4, 10 epochs, sigma 8 (claim 0.44-0.47): without noise
    the included ood canaries' loss falls and the claim is refuted (measured 0.57-1.08 over
    seeds 0-4); mislabelled canaries are weaker on this task (0-0.71 over seeds 0-4), so only
    their bookkeeping is checked; with noise, neither refutes the claim."""
    config = DPSGDConfig(noise_multiplier=8.0, max_grad_norm=1.0, batch_size=32, epochs=10, lr=4.0)
    broken = audit_dp_sgd(digits_mlp, small_digits, config, canaries=100, canary_kind=kind,
                          dp_optimizer_class=NoNoiseDPOptimizer, num_classes=10)
    correct = audit_dp_sgd(digits_mlp, small_digits, config, canaries=100, canary_kind=kind, num_classes=10)
    if kind == "ood":
        assert broken.flagged
    assert not correct.flagged
    assert broken.counts["included"] == correct.counts["included"]  # same seed, same draw
    assert broken.details["canary_kind"] == kind and broken.counts["canaries"] == 100


def test_many_runs(small_digits):
    """256 records (q = 1/4, 12 steps), sigma 16: claim 0.21; one dirac canary in every other
    of 40 runs; without noise the 10 + 10 evaluation runs are (nearly) all told apart, which
    certifies 0.81 (all right) or ~0.45 (one wrong)."""
    data = TensorDataset(*(t[:256] for t in small_digits.tensors))
    config = DPSGDConfig(noise_multiplier=16.0, max_grad_norm=1.0, batch_size=64, epochs=3)
    broken = audit_dp_sgd(lambda: digits_mlp(16), data, config, runs=40, dp_optimizer_class=NoNoiseDPOptimizer)
    assert broken.method == "clopper_pearson" and broken.details["runs"] == 40
    assert sum(broken.counts.values()) == 20  # the evaluation half
    assert broken.flagged
    correct = audit_dp_sgd(lambda: digits_mlp(16), data, config, runs=12)
    assert not correct.flagged


def test_dirac_injection_is_exact():
    """Zero inputs and no bias: the data's gradient is exactly 0, so (without noise) each
    observation is 1 where the canary joined the batch and 0 elsewhere."""
    torch.manual_seed(0)
    data = TensorDataset(torch.zeros(40, 4), torch.randint(0, 2, (40,)))
    seen = {}

    class Spy(NoNoiseDPOptimizer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["opt"] = self

    config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=2.5, batch_size=10, epochs=5)
    audit_dp_sgd(lambda: nn.Linear(4, 2, bias=False), data, config, canaries=8, dp_optimizer_class=Spy,
                 guesses=(1, 0))
    opt = seen["opt"]
    z = torch.stack(opt.canary_observations)  # (steps, canaries)
    assert z.shape == (20, 8)
    assert torch.equal(z.round(), (z > 0.5).double()) and torch.allclose(z, z.round(), atol=1e-6)
    assert torch.equal(z.sum(0).round().long(), opt.canary_joined)
    assert int(opt.canary_joined[~opt.canary_included].sum()) == 0
    assert int(opt.canary_joined[opt.canary_included].sum()) > 0
    assert torch.all(opt.canary_norm == 2.5)


def test_dirac_canaries_draw_and_gather():
    params = [torch.zeros(3, 2), torch.zeros(5)]
    c = DiracCanaries.draw(params, 11, torch.Generator().manual_seed(0))
    pairs = set(zip(c.param_index.tolist(), c.flat_index.tolist()))
    assert len(pairs) == 11 == 6 + 5  # every coordinate once
    values = [torch.arange(6.0).view(3, 2), 10 + torch.arange(5.0)]
    got = c.gather(values)
    want = torch.tensor([values[k].reshape(-1)[j] for k, j in zip(c.param_index.tolist(), c.flat_index.tolist())])
    assert torch.equal(got, want.double())
    with pytest.raises(ValueError, match="canaries must be <= the number of trainable parameters"):
        DiracCanaries.draw(params, 12)


def test_input_canaries_kinds():
    x, y = torch.rand(50, 3), torch.randint(0, 4, (50,))
    g = torch.Generator().manual_seed(0)
    cx, cy = input_canaries(x, y, 20, kind="mislabelled", num_classes=4, generator=g)
    rows = [int(torch.nonzero((x == r).all(1)).flatten()[0]) for r in cx]
    assert all(int(cy[i]) != int(y[r]) for i, r in enumerate(rows))  # always a wrong label
    assert len(set(rows)) == 20
    ox, oy = input_canaries(x, y, 20, kind="ood", generator=g)
    assert ox.shape == (20, 3) and float(ox.min()) >= float(x.min()) and float(ox.max()) <= float(x.max())
    assert int(oy.max()) < 4
    with pytest.raises(ValueError, match="kind"):
        input_canaries(x, y, 3, kind="odd")
    with pytest.raises(ValueError, match="count"):
        input_canaries(x, y, 0)
    with pytest.raises(TypeError, match="integer class labels"):
        input_canaries(x, y.float(), 3)


def test_per_layer_clipping_config_runs(small_digits):
    config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=(0.5, 0.5, 0.5, 0.5), epochs=1,
                         engine_options={"clipping": "per_layer"})
    got = audit_dp_sgd(digits_mlp, small_digits, config, canaries=200)
    assert not got.flagged and got.counts["canaries"] == 200


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(noise_multiplier=0.0, max_grad_norm=1.0), ValueError, "noise_multiplier"),
    (dict(noise_multiplier=1.0, max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(noise_multiplier=1.0, max_grad_norm=1.0, epochs=0), ValueError, "epochs"),
    (dict(noise_multiplier=1.0, max_grad_norm=1.0, batch_size=2.0), TypeError, "batch_size"),
    (dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=0.0), ValueError, "delta"),
    (dict(noise_multiplier=1.0, max_grad_norm=1.0, accountant="gdp"), ValueError, "accountant"),
    (dict(noise_multiplier=1.0, max_grad_norm=1.0, engine_options={"noise_seed": 3}), ValueError, "engine_options"),
    (dict(noise_multiplier=1.0, max_grad_norm=1.0, loss=3), TypeError, "loss"),
])
def test_config_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        DPSGDConfig(**kwargs)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(canary_kind="gradient"), ValueError, "canary_kind"),
    (dict(observe="loss"), ValueError, "observe"),
    (dict(runs=3), ValueError, "runs"),
    (dict(canaries=0), ValueError, "canaries"),
    (dict(canaries=10**6), ValueError, "trainable parameters"),
    (dict(confidence=1.5), ValueError, "confidence"),
    (dict(dp_optimizer_class=torch.optim.SGD), TypeError, "dp_optimizer_class"),
    (dict(model_fn=lambda: 3), TypeError, "model_fn must return"),
    (dict(train=[1, 2]), TypeError, "train must be a TensorDataset"),
    (dict(config={"noise_multiplier": 1.0}), TypeError, "config must be a DPSGDConfig"),
])
def test_audit_bad_input(small_digits, kwargs, err, match):
    args = dict(model_fn=digits_mlp, train=small_digits,
                config=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        audit_dp_sgd(args.pop("model_fn"), args.pop("train"), args.pop("config"), **args)
