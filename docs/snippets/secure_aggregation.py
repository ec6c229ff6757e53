"""Tutorial "Secure aggregation": one protocol round by hand, then SecAggFedAvg in a simulation."""
# --8<-- [start:secure_sum]
import torch

from ppml_fast.federated.secagg import secure_sum

torch.manual_seed(0)
updates = [torch.randn(1000) * 0.1 for _ in range(8)]        # 8 clients' flat updates
result = secure_sum(updates, clip_range=1.0,                 # coordinates clipped to [-1, 1]
                    drop_before_masking=[3])                 # client 3 drops out mid-round
exact = sum(u.double() for i, u in enumerate(updates) if i != 3)
print(f"survivors {result.survivors}, dropped {result.dropped}")
print(f"max error {(result.total - exact).abs().max():.2e} "
      f"(bound {result.error_bound:.2e})")
# --8<-- [end:secure_sum]
assert result.dropped == (3,) and 3 not in result.survivors
assert (result.total - exact).abs().max() <= result.error_bound

# --8<-- [start:strategy]
from torch import nn

from ppml_fast.datasets import digits
from ppml_fast.federated import (Client, DPFedAvgFixed, FedAvg, SecAggFedAvg, iid_partition,
                                 run_simulation)

train, test = digits()
clients = [Client(part, cid=i) for i, part in enumerate(iid_partition(train, 20, seed=0))]
model_fn = lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

# secure aggregation alone: the server sees only the (weighted) mean of the round's updates
plain = SecAggFedAvg(FedAvg(), clip_range=1.0, max_weight=100)
history = run_simulation(model_fn, clients, plain, rounds=5, clients_per_round=10,
                         lr=0.3, eval_dataset=test, progress=False)
print(f"SecAgg FedAvg: accuracy {history.rounds[-1]['accuracy']:.3f}")

# with DP-FedAvg: central noise added to the unmasked sum, accounted as usual
private = SecAggFedAvg(DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0))
history = run_simulation(model_fn, clients, private, rounds=5, clients_per_round=10,
                         lr=0.3, eval_dataset=test, delta=1e-3, progress=False)
last = history.rounds[-1]
print(f"SecAgg + DP-FedAvg: accuracy {last['accuracy']:.3f}, epsilon {last['epsilon']:.2f}")
# --8<-- [end:strategy]
assert last["epsilon"] > 0
