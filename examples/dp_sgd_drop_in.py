"""An ordinary PyTorch training loop on sklearn's digits, made differentially private by two
lines (marked), with a hard budget stop.

    python examples/dp_sgd_drop_in.py [--epochs 20] [--max-epsilon 3.0]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast import PrivacyBudgetExceeded, PrivacyEngine
from ppml_fast.datasets import digits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a small MLP: threads cost more than they give
    train, test = digits(seed=args.seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(train, batch_size=64)

    engine = PrivacyEngine()                                               # (1) the engine
    model, optimizer, loader = engine.make_private(                       # (2) make private
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=args.noise_multiplier, max_grad_norm=1.0,
        max_epsilon=args.max_epsilon, delta=args.delta, noise_seed=args.seed,
        generator=torch.Generator().manual_seed(args.seed))

    stopped_at = None
    try:
        for epoch in range(args.epochs):
            for x, y in loader:                                           # the usual loop
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            print(f"epoch {epoch + 1}: epsilon {engine.get_epsilon(args.delta):.3f}")
    except PrivacyBudgetExceeded as e:
        stopped_at = optimizer.steps
        print(f"budget reached after {stopped_at} steps: {e}")
    with torch.no_grad():
        accuracy = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    epsilon = engine.get_epsilon(args.delta)
    print(f"test accuracy {accuracy:.3f} at epsilon {epsilon:.3f} (delta {args.delta:g})")
    return {"accuracy": accuracy, "epsilon": epsilon, "stopped_at": stopped_at}


if __name__ == "__main__":
    main()
