"""Controlling the privacy budget: calibrate the noise for a target epsilon, decay it with a
schedule (accounted step by step), and record every release of a data set in a ledger that
refuses to overspend.

    python examples/budget_control.py [--ledger ./privacy-ledger.json]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast import PrivacyBudgetExceeded, PrivacyEngine
from ppml_fast.accounting import (
    ComposedEvent,
    GaussianEvent,
    PoissonSampledEvent,
    PrivacyLedger,
    SelfComposedEvent,
)
from ppml_fast.datasets import digits
from ppml_fast.mechanisms import NoiseSource, gaussian_mechanism
from ppml_fast.privacy import ExponentialNoise


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ledger", default=None, help="JSON ledger file (default: a temporary one)")
    p.add_argument("--budget", type=float, default=4.0, help="epsilon budget of the data set")
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    path = args.ledger or os.path.join(tempfile.mkdtemp(), "ledger.json")
    delta = 1e-5

    torch.manual_seed(0)
    torch.set_num_threads(1)
    train, _ = digits(seed=0)
    ledger = PrivacyLedger(path)
    ledger.add_dataset("digits-train", epsilon_budget=args.budget, delta=delta)

    # 1. a released statistic: the mean image, with the analytic Gaussian noise for (0.5, delta)
    x = train.tensors[0]
    # (ledger=: the spend is recorded durably before any noise is drawn)
    mean, event = gaussian_mechanism(x.mean(0), sensitivity=(64 ** 0.5) / len(x), epsilon=0.5,
                                     delta=delta, rng=NoiseSource(seed=1), ledger=ledger,
                                     dataset="digits-train", what="mean image")

    # 2. DP-SGD with the noise calibrated for what is left, then decayed each epoch
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    engine = PrivacyEngine()
    loader = DataLoader(train, batch_size=64)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
        target_epsilon=args.budget / 2, target_delta=delta, epochs=args.epochs, max_grad_norm=1.0,
        noise_seed=0, generator=torch.Generator().manual_seed(0))
    schedule = ExponentialNoise(optimizer, gamma=0.98)
    for _ in range(args.epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        schedule.step()
    # the training's events, as the engine's accountant composed them (one per sigma of the schedule)
    training = ComposedEvent(tuple(
        SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(sigma)), n)
        for _kind, q, sigma, n in engine.accountant.events))
    total = ledger.spend("digits-train", training, what=f"DP-SGD, {optimizer.steps} steps")

    # 3. one more release that would overspend is refused, and the file is unchanged
    with open(path, "rb") as f:
        before = f.read()
    try:
        ledger.spend("digits-train", SelfComposedEvent(training, 3), what="three more trainings")
        refused = False
    except PrivacyBudgetExceeded as e:
        refused = True
        print(f"refused: {e}")
    with open(path, "rb") as f:
        assert f.read() == before
    for r in ledger.records("digits-train"):
        print(f"{r.time}  {r.what:<28} total epsilon {r.total_epsilon:.3f}")
    print(f"spent {ledger.spent('digits-train'):.3f} of {args.budget} (remaining "
          f"{ledger.remaining('digits-train'):.3f}); ledger: {path}")
    return {"total": total, "refused": refused, "path": path}


if __name__ == "__main__":
    main()
