"""The old PySyft "virtual workers" tutorial, done right: each worker owns its data, only
parameters travel, the server averages the workers' updates (FedAvg) and, with DP-FedAvg,
clips each update and adds noise so that the model is differentially private per worker.

    python examples/federated_virtual_workers.py [--workers 100] [--per-round 20] [--rounds 40]

The first part writes the server loop out by hand so you can see what travels (a parameter
vector out, a FitResult back); the second runs the same thing with ``run_simulation``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from ppml_fast.datasets import digits
from ppml_fast.federated import (
    Client,
    ClientProxy,
    DPFedAvgFixed,
    FedAvg,
    ParameterLayout,
    iid_partition,
    run_simulation,
)
from ppml_fast.federated.client import evaluate_model


def model_fn() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=100)
    p.add_argument("--per-round", type=int, default=20,
                   help="expected workers per round (each is sampled with probability per-round / workers)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--clip-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    # Each worker owns one shard of the training data; the server never holds it.
    train, test = digits(seed=args.seed)
    workers = [Client(shard, cid=i) for i, shard in enumerate(iid_partition(train, args.workers, seed=args.seed))]

    # --- Part 1: the server loop by hand ---------------------------------------------------
    model = model_fn()
    layout = ParameterLayout.of(model)
    parameters = layout.flatten(model)  # what travels to the workers: one flat vector
    strategy = DPFedAvgFixed(FedAvg(), noise_multiplier=args.noise_multiplier,
                             clip_norm=args.clip_norm, seed=args.seed)
    proxies = [ClientProxy(w.cid) for w in workers]
    rng = np.random.default_rng(args.seed)
    for rnd in range(1, args.rounds + 1):
        chosen = strategy.configure_fit(rnd, parameters, proxies, args.per_round, rng)
        results = []
        for proxy, extra in chosen:  # on each worker's device: local training on its own data
            config = {"model": model, "seed": args.seed * 100_003 + rnd * 1_009 + proxy.cid,
                      "lr": 0.3, "batch_size": 16, "local_epochs": 2, **extra}
            results.append((proxy, workers[proxy.cid].fit(parameters, config)))  # only an update comes back
        parameters, _ = strategy.aggregate_fit(rnd, parameters, results, [])
    layout.load(model, parameters)
    by_hand = evaluate_model(model, *test.tensors).metrics["accuracy"]
    eps_by_hand = strategy.epsilon(args.delta)
    sent = parameters.numel() * parameters.element_size()
    print(f"by hand: {args.rounds} rounds, {sent} bytes each way per worker per round; "
          f"test accuracy {by_hand:.3f}, epsilon {eps_by_hand:.2f} at delta {args.delta:g} (per worker)")

    # --- Part 2: the same with run_simulation -----------------------------------------------
    history = run_simulation(
        model_fn, workers,
        DPFedAvgFixed(FedAvg(), noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm,
                      seed=args.seed),
        rounds=args.rounds, clients_per_round=args.per_round, batch_size=16, lr=0.3, local_epochs=2,
        seed=args.seed, eval_dataset=test, delta=args.delta, progress=False)
    last = history.rounds[-1]
    print(f"run_simulation: test accuracy {last['accuracy']:.3f}, epsilon {last['epsilon']:.2f}")
    return {"accuracy_by_hand": by_hand, "epsilon_by_hand": eps_by_hand,
            "accuracy": last["accuracy"], "epsilon": last["epsilon"], "bytes_per_update": sent}


if __name__ == "__main__":
    main()
