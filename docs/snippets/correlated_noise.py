"""How-to "Correlated noise": DP-FTRL / banded matrix factorization with make_private, and
DPFTRLFedAvg in a federated simulation."""
# --8<-- [start:banded]
import math

import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.accounting import GaussianEvent, PLDAccountant
from ppml_fast.datasets import digits
from ppml_fast.privacy import PrivacyEngine

torch.manual_seed(0)
train, test = digits()
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
    data_loader=DataLoader(train, batch_size=64, shuffle=False),   # fixed order: every_epoch
    noise_multiplier=2.0, max_grad_norm=1.0, poisson_sampling=False,
    noise_mechanism="banded_mf", bands=8, epochs=4)                # plan: 4 x len(loader) steps

loss_fn = nn.CrossEntropyLoss()
for epoch in range(4):
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
x, y = test.tensors
accuracy = (model(x).argmax(1) == y).float().mean().item()
plan = optimizer.correlated  # strategy C, participation schema, step
S = plan.strategy.sensitivity_sq_prefix(plan.steps - 1, plan.participation)
print(f"{optimizer.steps} steps, {plan.participation.kind}, sensitivity {math.sqrt(S):.3f}, "
      f"accuracy {accuracy:.2f}, epsilon {engine.get_epsilon(1e-5):.2f}")
# --8<-- [end:banded]
# the reported epsilon is that of one Gaussian mechanism with sensitivity sqrt(S)
one = PLDAccountant().compose(GaussianEvent(2.0 / math.sqrt(S))).get_epsilon(1e-5)
assert abs(engine.get_epsilon(1e-5) - one) < 0.02 * one, (engine.get_epsilon(1e-5), one)
assert accuracy > 0.5, accuracy

# --8<-- [start:federated]
from ppml_fast.federated import DPFTRLFedAvg, FedAvg, iid_partition, run_simulation, Client

clients = [Client(p, cid=i) for i, p in enumerate(iid_partition(train, 40, seed=0))]
strategy = DPFTRLFedAvg(FedAvg(), noise_multiplier=2.0, clip_norm=0.5, rounds=12,
                        mechanism="banded_mf", bands=4)   # each client at most once every 4 rounds
history = run_simulation(lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                         clients, strategy, rounds=12, clients_per_round=10, lr=0.1,
                         batch_size=16, eval_dataset=test, progress=False, delta=1e-5)
print(f"{len(history.rounds)} rounds, user-level epsilon {history.rounds[-1]['epsilon']:.2f}")
# --8<-- [end:federated]
assert len(history.rounds) == 12
