"""Tutorial "DP-SGD with PrivacyEngine": train a small MLP on sklearn's digits with DP-SGD."""
# --8<-- [start:train]
import torch
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast import PrivacyEngine
from ppml_fast.datasets import digits

torch.manual_seed(0)
train, test = digits()                                     # 1,437 train / 360 test images, 8x8 pixels
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
train_loader = DataLoader(train, batch_size=64)             # 64 is the *expected* batch size

engine = PrivacyEngine()                                    # accountant="pld" (default) or "rdp"
model, optimizer, train_loader = engine.make_private(
    module=model, optimizer=optimizer, data_loader=train_loader,
    noise_multiplier=1.0,                                   # sigma: noise std / max_grad_norm
    max_grad_norm=1.0,                                      # C: each record's gradient clipped to C
    max_epsilon=8.0, delta=1e-5)                            # hard stop: PrivacyBudgetExceeded

loss_fn = nn.CrossEntropyLoss()
for epoch in range(5):
    for x, y in train_loader:                               # Poisson-sampled: sizes vary, may be 0
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: epsilon {engine.get_epsilon(delta=1e-5):.2f}")
# --8<-- [end:train]

# --8<-- [start:evaluate]
x_test, y_test = test.tensors
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
print(f"test accuracy {accuracy:.3f} at epsilon {engine.get_epsilon(delta=1e-5):.2f} (delta 1e-5)")
# --8<-- [end:evaluate]
assert accuracy > 0.7, accuracy
assert 0 < engine.get_epsilon(delta=1e-5) <= 8.0

# --8<-- [start:with_epsilon]
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
engine = PrivacyEngine()
model, optimizer, train_loader = engine.make_private_with_epsilon(
    module=model, optimizer=optimizer, data_loader=DataLoader(train, batch_size=64),
    target_epsilon=3.0, target_delta=1e-5, epochs=5, max_grad_norm=1.0)
print(f"sigma for epsilon 3 after 5 epochs: {optimizer.noise_multiplier:.3f}")
# --8<-- [end:with_epsilon]
assert optimizer.noise_multiplier > 1.0

# --8<-- [start:scheduler]
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
for x, y in train_loader:
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()
    scheduler.step()                                        # halves the lr every 10 steps
print(f"lr after one epoch ({len(train_loader)} steps): {optimizer.param_groups[0]['lr']:.4f}")
# --8<-- [end:scheduler]
assert isinstance(optimizer, torch.optim.Optimizer)
assert optimizer.param_groups[0]["lr"] == 0.5 * 0.5 ** (len(train_loader) // 10)
