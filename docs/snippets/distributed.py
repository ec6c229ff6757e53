"""How-to "Distributed training": data-parallel DP-SGD over torch.distributed.

Run with ``torchrun --nproc_per_node=2 distributed.py``; run alone (as the docs test does), it
starts a one-process group itself.
"""
import os
import tempfile

if "RANK" not in os.environ:                                 # not under torchrun: a world of one
    os.environ.update(RANK="0", WORLD_SIZE="1")
    INIT = f"file://{tempfile.mkdtemp()}/init"
else:
    INIT = "env://"

# --8<-- [start:distributed]
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ppml_fast.datasets import digits
from ppml_fast.privacy import PrivacyEngine

dist.init_process_group("gloo", init_method=INIT,            # torchrun: init_method="env://"
                        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
torch.manual_seed(0)                                          # the same initial model on every rank
train, _ = digits()
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
    data_loader=DataLoader(train, batch_size=64),             # every rank: the whole data set
    noise_multiplier=1.0, max_grad_norm=1.0, distributed=True)

loss_fn = nn.CrossEntropyLoss()
for x, y in loader:                                           # this rank's Poisson-sampled shard
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()                                          # all-reduce clipped sums, noise once
if dist.get_rank() == 0:
    print(f"{dist.get_world_size()} rank(s), {optimizer.steps} steps, "
          f"epsilon {engine.get_epsilon(delta=1e-5):.2f}")
dist.destroy_process_group()
# --8<-- [end:distributed]
assert optimizer.steps == len(loader)
