"""Calibration: noise multiplier for a budget, steps a budget affords, and the CLI commands."""

from __future__ import annotations

import pytest

from ppml_fast.accounting import GaussianEvent, PoissonSampledEvent, epsilon, get_noise_multiplier, get_steps
from ppml_fast.cli import main

MNIST = dict(sample_rate=256 / 60_000, target_delta=1e-5)


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
def test_noise_multiplier_meets_the_target_within_the_tolerance(target):
    sigma = get_noise_multiplier(target_epsilon=target, steps=5000, epsilon_tolerance=0.01, **MNIST)
    spent = epsilon(noise_multiplier=sigma, sample_rate=MNIST["sample_rate"], steps=5000,
                    delta=MNIST["target_delta"])
    assert target - 0.01 <= spent <= target
    # and a slightly smaller sigma would overspend
    assert epsilon(noise_multiplier=sigma * 0.98, sample_rate=MNIST["sample_rate"], steps=5000,
                   delta=MNIST["target_delta"]) > target - 0.01


def test_epochs_are_steps_over_the_sample_rate():
    a = get_noise_multiplier(target_epsilon=2.0, epochs=10, **MNIST)
    b = get_noise_multiplier(target_epsilon=2.0, steps=2344, **MNIST)  # ceil(10 * 60000 / 256)
    assert a == b


def test_unreachable_target_raises():
    with pytest.raises(ValueError, match="target_epsilon"):
        get_noise_multiplier(target_epsilon=1e-6, target_delta=1e-5, sample_rate=1.0, steps=10**6)


def test_steps_a_budget_affords_is_the_largest_that_fits():
    kw = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, noise_multiplier=1.0)
    t = get_steps(**kw)
    assert t > 0
    e = lambda n: epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=n, delta=1e-5)  # noqa: E731
    assert e(t) <= 3.0 < e(t + 1)
    assert get_steps(target_epsilon=1e-3, target_delta=1e-5, sample_rate=1.0, noise_multiplier=1.0) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=float("nan")), "target_epsilon"),
        (dict(target_delta=1.0), "target_delta"),
        (dict(target_delta=-1e-5), "target_delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(accountant="prv"), "accountant"),
        (dict(steps=0), "steps"),
        (dict(steps=None), "exactly one of steps and epochs"),
        (dict(epochs=3.0), "exactly one of steps and epochs"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        get_noise_multiplier(**args)


def test_cli_epsilon_and_noise_multiplier(capsys):
    assert main(["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0",
                 "--steps", "1000", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    want = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert f"epsilon = {want:.6g}" in out
    assert main(["noise-multiplier", "--target-epsilon", "2", "--delta", "1e-5",
                 "--sample-rate", "0.01", "--steps", "1000"]) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("=")[1].split()[0])
    assert epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=1e-5) <= 2.0


def test_cli_bad_input_exits_2_with_the_argument_named(capsys):
    assert main(["epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1.0",
                 "--steps", "10", "--delta", "1e-5"]) == 2
    assert "sample_rate" in capsys.readouterr().err


def test_cli_pld_accountant_is_tighter(capsys):
    args = ["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.0", "--steps", "1000",
            "--delta", "1e-5"]
    assert main(args + ["--accountant", "pld"]) == 0
    pld = float(capsys.readouterr().out.split("=")[1].split()[0])
    rdp = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
    assert pld == pytest.approx(epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000,
                                        delta=1e-5, accountant="pld"), rel=1e-5)
    assert 0.7 * rdp < pld < rdp
    assert main(["noise-multiplier", "--target-epsilon", "2", "--delta", "1e-5", "--sample-rate",
                 "0.01", "--steps", "1000", "--accountant", "pld"]) == 0
    sigma = float(capsys.readouterr().out.split("=")[1].split()[0])
    assert epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=1000, delta=1e-5, accountant="pld") <= 2.0


def test_get_steps_with_pld_is_at_least_rdp():
    from ppml_fast.accounting import PLDAccountant

    kw = dict(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, noise_multiplier=1.2)
    rdp_steps = get_steps(**kw)
    pld_steps = get_steps(**kw, accountant="pld")
    assert pld_steps >= rdp_steps >= 1
    ev = PoissonSampledEvent(0.05, GaussianEvent(1.2))
    assert PLDAccountant().compose(ev, pld_steps).get_epsilon(1e-5) <= 2.0
    assert PLDAccountant().compose(ev, pld_steps + 1).get_epsilon(1e-5) > 2.0
