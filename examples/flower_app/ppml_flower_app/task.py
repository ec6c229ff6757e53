"""The model and each node's data: a small MLP on synthetic classification data, deterministic
per node (partition id) and round, so that two strategies fed the same replies can be compared."""

from __future__ import annotations

import torch
from torch import nn


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def load_data(partition_id: int, n: int = 64) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1000 + int(partition_id))
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return torch.utils.data.TensorDataset(x, y)


def train(model: nn.Module, data, *, seed: int, lr: float = 0.1, epochs: int = 1) -> None:
    """Plain SGD, shuffled by ``seed`` (deterministic)."""
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


@torch.no_grad()
def evaluate(model: nn.Module, data) -> tuple[float, float]:
    x, y = data.tensors
    out = model(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
