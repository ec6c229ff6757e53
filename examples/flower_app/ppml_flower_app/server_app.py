"""The ServerApp: runs the strategies named in the run config one after the other, each from the
same initial model, and (with ``out`` set) writes each one's final arrays and per-round metrics
to ``<out>/<strategy>.npz`` (a deployed ServerApp runs in its own process)."""

from __future__ import annotations

import json
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from ppml_fast.integrations.flower import DPFedAvg, FedAvg
from ppml_flower_app import task

app = ServerApp()

#: results of the last run in this process: {strategy: (arrays, {round: train metrics})}
RESULTS: dict = {}


def make_strategy(name: str):
    if name == "flower":
        return FlowerFedAvg(fraction_evaluate=0.0), {}
    if name == "fedavg":
        return FedAvg(fraction_evaluate=0.0), {}
    if name == "dpfedavg":
        return DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=1.0, delta=1e-5,
                        max_epsilon=10.0, fraction_evaluate=0.0), {}
    if name == "dpsgd":
        return FedAvg(fraction_evaluate=0.0), {"mode": "dp-sgd"}
    raise ValueError(f"unknown strategy {name!r}; expected flower, fedavg, dpfedavg or dpsgd")


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config.get("num-server-rounds", 2))
    names = str(context.run_config.get("strategies", "fedavg,dpfedavg,dpsgd")).split(",")
    out = str(context.run_config.get("out", ""))
    initial = ArrayRecord({k: Array(v) for k, v in task.initial_arrays().items()})
    for name in names:
        strategy, config = make_strategy(name.strip())
        result = strategy.start(grid=grid, initial_arrays=initial,
                                num_rounds=rounds, train_config=ConfigRecord(config))
        metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
        RESULTS[name] = (result.arrays.to_numpy_ndarrays(), metrics)
        if out:
            arrays = result.arrays.to_numpy_ndarrays()
            np.savez(os.path.join(out, f"{name}.npz"), *arrays,
                     metrics=np.array(json.dumps({str(k): v for k, v in metrics.items()})))
