"""Run by test_heap.py in a fresh process: page faults of each of 8 DP steps of an MLP whose
materialised per-sample gradients (3 x 16 MiB) are freed at the end of every step."""
import resource, sys, warnings
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ppml_fast.privacy import PrivacyEngine
warnings.simplefilter("ignore")
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512))
x, y = torch.randn(16, 512), torch.randn(16, 512)
loader = DataLoader(TensorDataset(x, y), batch_size=16)
model, opt, _ = PrivacyEngine().make_private(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
    data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    grad_sample_mode="materialize", noise_seed=0)
faults = []
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
