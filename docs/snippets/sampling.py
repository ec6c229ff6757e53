"""How-to "Accounting for the batches you really use": what poisson_sampling=False reports
(shuffled fixed-size batches, the honest epsilon without amplification) and the substitution
account of the same run."""
# --8<-- [start:shuffled]
import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.datasets import digits
from ppml_fast.privacy import PrivacyEngine

torch.manual_seed(0)
train, _ = digits()
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
    data_loader=DataLoader(train, batch_size=64, shuffle=True),
    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
loss_fn = nn.CrossEntropyLoss()
for x, y in loader:                      # one epoch
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()
print(f"epsilon {engine.get_epsilon(1e-5):.2f}")   # the honest epsilon for shuffled batches
print(engine.accounting_analysis)                  # which analysis that is, in words
# --8<-- [end:shuffled]

# --8<-- [start:substitution]
from ppml_fast.accounting import PLDAccountant, ShuffledBatchesEvent

event = ShuffledBatchesEvent.dp_sgd(1.0, steps_per_epoch=29, steps=290, adjacency="substitution")
print(f"substitution, 10 epochs: epsilon {PLDAccountant().compose(event).get_epsilon(1e-5):.2f}")
# --8<-- [end:substitution]

# --8<-- [start:attach]
from ppml_fast.privacy import sampling

model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
    data_loader=DataLoader(train, batch_size=64, shuffle=True),
    noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
plan = sampling.analyse(loader, adjacency="substitution")
sampling.attach(optimizer, plan, loader)   # replaces the zero-out plan make_private attached
print(plan.analysis)                       # the sentence to report
# --8<-- [end:attach]
