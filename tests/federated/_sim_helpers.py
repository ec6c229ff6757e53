"""Shared pieces of the simulation and backend tests: a small generated task, a tiny MLP, and
clients that misbehave on purpose (subclasses of Client)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ppml_fast import PrivacyBudgetExceeded
from ppml_fast.datasets import synthetic_classification
from ppml_fast.federated import Client, FitResult, iid_partition

FEATURES, CLASSES = 6, 3


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def make_clients(num_clients: int = 8, n: int = 120, seed: int = 0) -> list[Client]:
    data = synthetic_classification(n, features=FEATURES, classes=CLASSES, seed=seed)
    return [Client(p) for p in iid_partition(data, num_clients, seed=seed)]


def eval_set(n: int = 300, seed: int = 0):
    # the same centres as make_clients(seed=seed): a fresh draw of the same mixture
    data = synthetic_classification(n + 1000, features=FEATURES, classes=CLASSES, seed=seed)
    x, y = data.tensors
    return torch.utils.data.TensorDataset(x[-n:], y[-n:])




class RaisingClient(Client):
    def fit(self, parameters, config):
        raise RuntimeError("boom")


class BudgetClient(Client):
    def fit(self, parameters, config):
        raise PrivacyBudgetExceeded("no budget left")


class SlowClient(Client):
    delay = 0.0

    def fit(self, parameters, config):
        time.sleep(self.delay)
        return super().fit(parameters, config)


class NaNClient(Client):
    def fit(self, parameters, config):
        res = super().fit(parameters, config)
        update = res.update.clone()
        update[0] = float("nan")
        return FitResult(update, res.num_examples, res.metrics)


class InfClient(Client):
    def fit(self, parameters, config):
        res = super().fit(parameters, config)
        return FitResult(torch.full_like(res.update, float("inf")), res.num_examples, res.metrics)


class ShapeClient(Client):
    def fit(self, parameters, config):
        res = super().fit(parameters, config)
        return FitResult(res.update[:-1], res.num_examples, res.metrics)


class FailsAfterSteps(Client):
    """Local DP, full batch: every fit takes ``steps`` DP-SGD steps at sampling rate q = 1 (batch
    = all its examples, one step per epoch), so each step's loss is computed exactly once; the
    first ``failing_fits`` fits raise in the loss of step ``fail_at + 1``, after ``fail_at``
    noisy steps were taken and accounted."""

    steps, fail_at, failing_fits = 4, 2, 1

    def fit(self, parameters, config):
        calls = 0
        failing = self.failing_fits > 0

        def loss_fn(out, y):
            nonlocal calls
            calls += 1
            if failing and calls > self.fail_at:
                self.failing_fits -= 1
                raise RuntimeError(f"device lost at step {calls}")
            return F.cross_entropy(out, y)

        return super().fit(parameters, {**config, "batch_size": self.num_examples,
                                         "local_epochs": self.steps, "loss_fn": loss_fn})
