"""Tutorial "Federated learning": FedAvg, user-level DP (DP-FedAvg) and local DP on digits."""
# --8<-- [start:setup]
from torch import nn

from ppml_fast.datasets import digits
from ppml_fast.federated import Client, FedAvg, dirichlet_partition, run_simulation

train, test = digits()
parts = dirichlet_partition(train, 50, alpha=0.5, seed=0)     # 50 clients, label-skewed
clients = [Client(part, cid=i) for i, part in enumerate(parts)]


def make_model() -> nn.Module:                                  # same architecture every call
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
# --8<-- [end:setup]


# --8<-- [start:fedavg]
history = run_simulation(make_model, clients, FedAvg(), rounds=10, clients_per_round=10,
                         backend="vectorized", local_epochs=2, batch_size=16, lr=0.3,
                         eval_dataset=test, progress=False)
for r in history.rounds[::3]:
    print(f"round {r['round']:2d}: accuracy {r['accuracy']:.3f}")
# --8<-- [end:fedavg]
assert history.rounds[-1]["accuracy"] > 0.6, history.rounds[-1]

# --8<-- [start:dp_fedavg]
from ppml_fast.federated import DPFedAvgFixed

strategy = DPFedAvgFixed(FedAvg(), noise_multiplier=1.0, clip_norm=1.0)   # user-level DP
history = run_simulation(make_model, clients, strategy, rounds=10, clients_per_round=25,
                         backend="vectorized", local_epochs=1, batch_size=16, lr=0.3,
                         eval_dataset=test, max_epsilon=10.0, delta=1e-3, progress=False)
last = history.rounds[-1]
print(f"DP-FedAvg: accuracy {last['accuracy']:.3f} at epsilon {last['epsilon']:.2f} per client")
# --8<-- [end:dp_fedavg]
assert 0 < last["epsilon"] <= 10.0, last

# --8<-- [start:local_dp]
from ppml_fast.federated import LocalDP

history = run_simulation(make_model, clients, FedAvg(), rounds=3, clients_per_round=10,
                         backend="sequential", local_epochs=1, batch_size=16, lr=0.3,
                         eval_dataset=test, progress=False,
                         local_dp=LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                          max_epsilon=8.0))
last = history.rounds[-1]
print(f"local DP: accuracy {last['accuracy']:.3f}, largest client epsilon {last['epsilon']:.2f}")
# --8<-- [end:local_dp]
assert 0 < last["epsilon"] <= 8.0, last
