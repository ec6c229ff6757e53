"""The model and each node's data, in numpy: softmax regression ("weight" (3, 8), "bias" (3,),
the keys and shapes of ``torch.nn.Linear(8, 3)``) on synthetic data, deterministic per node
(partition id) and round. Plain training needs no torch, so a deployed ClientApp process (Flower
starts one per message) starts fast; DP-SGD loads the same arrays into ``nn.Linear``."""

from __future__ import annotations

import numpy as np

KEYS = ("weight", "bias")


def initial_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"weight": (0.1 * rng.standard_normal((3, 8))).astype(np.float32),
            "bias": np.zeros(3, np.float32)}


def load_data(partition_id: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + int(partition_id))
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    return x, y


def num_examples(partition_id: int) -> int:
    """FedAvg's weight for the node: unequal across nodes, so the weighting is tested."""
    return 64 + 16 * int(partition_id)


def train(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, server_round: int,
          lr: float = 0.5, steps: int = 5) -> dict[str, np.ndarray]:
    """Full-batch gradient descent on the cross entropy; ``lr`` shrinks with the round."""
    w, b = arrays["weight"].astype(np.float64), arrays["bias"].astype(np.float64)
    onehot = np.eye(3)[y]
    for _ in range(steps):
        z = x @ w.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(y)
        w, b = w - lr / server_round * g.T @ x, b - lr / server_round * g.sum(0)
    return {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}


def evaluate(arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    z = x @ arrays["weight"].T.astype(np.float64) + arrays["bias"]
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((z.argmax(1) == y).mean())
