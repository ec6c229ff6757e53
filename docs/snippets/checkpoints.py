"""How-to "Resuming from checkpoints": save_checkpoint / load_checkpoint, with a privacy journal."""
import os
import tempfile

os.chdir(tempfile.mkdtemp())
# --8<-- [start:setup]
import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.datasets import digits
from ppml_fast.privacy import PrivacyEngine

train, _ = digits()
loss_fn = nn.CrossEntropyLoss()


def start(journal: str):
    """The same set-up in the first run and in the resumed one."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(train, batch_size=64), noise_multiplier=1.0, max_grad_norm=1.0,
        journal=journal)                                    # crash-safe record of every step
    return engine, model, optimizer, loader


def train_epoch(model, optimizer, loader):
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
# --8<-- [end:setup]


# --8<-- [start:save]
engine, model, optimizer, loader = start("run1.journal")
train_epoch(model, optimizer, loader)
engine.save_checkpoint("ckpt.pt", module=model, optimizer=optimizer,
                       checkpoint_dict={"epoch": 1})       # written atomically
train_epoch(model, optimizer, loader)                       # epoch 2 ... then the process dies
spent = engine.get_epsilon(delta=1e-5)
# --8<-- [end:save]
optimizer.journal.close()                                   # what a dying process does for us

# --8<-- [start:load]
engine, model, optimizer, loader = start("run1.journal")   # the same journal path
rest = engine.load_checkpoint("ckpt.pt", module=model, optimizer=optimizer)
print(f"resuming after epoch {rest['epoch']}: epsilon {engine.get_epsilon(delta=1e-5):.3f} "
      f"(spent before the crash: {spent:.3f})")
# --8<-- [end:load]
assert abs(engine.get_epsilon(delta=1e-5) - spent) <= 1e-9 * spent  # the lost epoch 2 counted
# --8<-- [start:continue]
for epoch in range(rest["epoch"], 3):
    train_epoch(model, optimizer, loader)
# --8<-- [end:continue]
assert engine.get_epsilon(delta=1e-5) > spent
