"""Helpers for the Flower tests: FitRes lists with random layers, and an in-process ClientProxy
so that Flower's own ``Server`` round loop runs without Ray."""

from __future__ import annotations

import numpy as np
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    DisconnectRes,
    FitRes,
    GetPropertiesRes,
    Status,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

SHAPES = [(8, 5), (5,), (3, 3, 2), ()]


def random_layers(rng: np.random.Generator, dtype=np.float32, shapes=SHAPES) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def fit_results(clients, num_examples, metrics=None):
    """[(proxy, FitRes)] with the given layers and counts (status OK)."""
    out = []
    for i, (layers, n) in enumerate(zip(clients, num_examples)):
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(layers), int(n),
                     {} if metrics is None else metrics[i])
        out.append((InProcessProxy(str(i), None), res))
    return out


class InProcessProxy(ClientProxy):
    """Calls a NumPyClient directly in this process (what Flower's gRPC/Ray proxies carry)."""

    def __init__(self, cid: str, client: NumPyClient | None) -> None:
        super().__init__(cid)
        self.client = client

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(Status(Code.OK, ""), {})

    def get_parameters(self, ins, timeout, group_id):
        return self.client.to_client().get_parameters(ins)

    def fit(self, ins, timeout, group_id):
        return self.client.to_client().fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.to_client().evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        return DisconnectRes("")


def manager_with(proxies) -> SimpleClientManager:
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    return manager


class LinearClient(NumPyClient):
    """Least squares on local data: one full-batch gradient step per fit (deterministic)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, fail: bool = False) -> None:
        self.x, self.y, self.fail = x, y, fail

    def fit(self, parameters, config):
        if self.fail:
            raise RuntimeError("this client always fails")
        w, b = parameters
        err = self.x @ w + b - self.y
        n = len(self.y)
        w = w - 0.1 * (self.x.T @ err) / n
        b = b - 0.1 * err.mean(axis=0)
        return [w.astype(np.float32), b.astype(np.float32)], n, {"loss": float((err ** 2).mean())}

    def evaluate(self, parameters, config):
        w, b = parameters
        loss = float(((self.x @ w + b - self.y) ** 2).mean())
        return loss, len(self.y), {"mse": loss}
