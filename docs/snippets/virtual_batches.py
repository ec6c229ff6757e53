"""How-to "Virtual batches": a large logical batch in small physical chunks (BatchMemoryManager)."""
# --8<-- [start:virtual]
import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.datasets import digits
from ppml_fast.privacy import BatchMemoryManager, PrivacyEngine

torch.manual_seed(0)
train, _ = digits()
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
    data_loader=DataLoader(train, batch_size=512),          # logical batch: 512 expected records
    noise_multiplier=1.0, max_grad_norm=1.0)

loss_fn = nn.CrossEntropyLoss()
with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64,
                        optimizer=optimizer) as physical_loader:
    for x, y in physical_loader:                            # at most 64 records at a time
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()                                    # steps once per logical batch
print(f"{optimizer.steps} noisy steps for {len(loader)} logical batches, "
      f"epsilon {engine.get_epsilon(delta=1e-5):.2f}")
# --8<-- [end:virtual]
assert optimizer.steps == len(loader), (optimizer.steps, len(loader))
