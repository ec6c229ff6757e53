"""Record-level DP-SGD inside a Flower ``ClientApp`` train function (Message API): the node trains
the received model with ppml_fast's ``PrivacyEngine.make_private`` (Poisson-sampled batches,
per-record clipping, Gaussian noise; Abadi et al. 2016, "Deep Learning with Differential
Privacy", CCS, Algorithm 1) and replies with its ArrayRecord and a MetricRecord holding ε.

The node's accountant persists across rounds in ``context.state`` (the node's own RecordDict,
which Flower keeps between the messages of a run), so the ε reported is the node's total for
its records over every round it trained, at ``delta``. ``max_epsilon`` stops the node's
training once the next step would pass it (``PrivacyBudgetExceeded``); the node then replies
with the model as trained so far and ``"dp-budget-exhausted": 1``.

What this does not cover: the server sees each node's model (record-level DP protects the
node's records in what it sends, not the node's participation); combine with
:class:`~ppml_fast.integrations.flower_dp.DPFedAvg` for user-level DP on the server side.

Noise keys come from OS entropy unless ``noise_seed`` is given; a seeded node derives one key
per round (SHA-256 of the seed and the round, :func:`ppml_fast.noise_keys.derived_key`) so no
two rounds share noise, and is then not private against whoever knows the seed.

Example (a ``ClientApp``)::

    app = ClientApp()

    @app.train()
    def train(msg, context):
        model, loader = Net(), my_loader(context.node_config["partition-id"])
        return dp_train(msg, context, model=model, data_loader=loader,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
"""

from __future__ import annotations

import json
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ppml_fast.accounting.errors import PrivacyBudgetExceeded
from ppml_fast.noise_keys import derived_key, noise_seed as _check_seed
from ppml_fast.privacy.engine import PrivacyEngine

__all__ = ["dp_train", "STATE_KEY"]

#: Where the node's accountant history lives in ``context.state`` (a ConfigRecord, JSON).
STATE_KEY = "ppml_fast.dp_sgd"


def dp_train(msg: Message, context: Context, *, model: nn.Module, data_loader: DataLoader,
             optimizer: torch.optim.Optimizer, noise_multiplier: float, max_grad_norm: float,
             delta: float, epochs: int = 1, loss_fn: Optional[Callable] = None,
             max_epsilon: Optional[float] = None, accountant: str = "pld",
             noise_seed: Optional[int] = None, arrayrecord_key: str = "arrays",
             num_examples: Optional[int] = None) -> Message:
    """Trains ``model`` on ``data_loader`` with DP-SGD from the arrays in ``msg`` and returns the
    reply: ``{"arrays": ArrayRecord, "metrics": MetricRecord}`` with "num-examples", "dp-epsilon",
    "dp-delta", "dp-steps" and "dp-budget-exhausted". The training loss is not reported (it is
    not noised). "num-examples" (FedAvg's weight) is released outside ε: it changes by one when
    a record is added or removed; pass a public ``num_examples`` to avoid that.

    Args:
        msg, context: the train function's arguments (``msg.content[arrayrecord_key]`` holds the
            global model's state dict; ``context.state`` keeps the accountant between rounds).
        model, optimizer, data_loader: plain PyTorch objects, built by the train function (the
            optimizer over ``model``'s parameters); ``make_private`` wraps them.
        noise_multiplier, max_grad_norm: σ and C of DP-SGD (σ: noise std as a multiple of C).
        delta: δ at which ε is reported (and ``max_epsilon`` checked).
        epochs: passes over the local data (>= 1); batches are Poisson-sampled at
            ``batch_size / len(dataset)``.
        loss_fn: ``loss_fn(output, target)``, mean-reduced (default: cross entropy).
        max_epsilon, accountant, noise_seed: as in ``PrivacyEngine.make_private``.
        num_examples: the weight to report (default ``len(data_loader.dataset)``).
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1; got {epochs!r}")
    if arrayrecord_key not in msg.content.array_records:
        raise ValueError(f"msg.content must hold an ArrayRecord under arrayrecord_key="
                         f"{arrayrecord_key!r}; it holds {list(msg.content.array_records)}")
    seed = _check_seed("noise_seed", noise_seed)
    server_round = int(msg.content.config_records.get("config", ConfigRecord()).get("server-round", 0))
    if seed is not None:  # one key per round: a reused key would repeat the noise
        seed = derived_key(seed, server_round)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.load_state_dict(msg.content[arrayrecord_key].to_torch_state_dict())

    engine = PrivacyEngine(accountant=accountant)
    if STATE_KEY in context.state.config_records:
        engine.accountant.load_state_dict(json.loads(context.state[STATE_KEY]["accountant"]))
    private, dp_optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=data_loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        max_epsilon=max_epsilon, delta=delta if max_epsilon is not None else None,
        noise_seed=seed)
    exhausted = 0
    try:
        for _ in range(epochs):
            for x, y in loader:
                dp_optimizer.zero_grad()
                loss_fn(private(x), y).backward()
                dp_optimizer.step()
    except PrivacyBudgetExceeded:
        exhausted = 1
    # record the node's history before the reply leaves (the reply is the release)
    context.state[STATE_KEY] = ConfigRecord({"accountant": json.dumps(engine.accountant.state_dict())})
    eps = engine.get_epsilon(delta)
    metrics = MetricRecord({
        "num-examples": len(data_loader.dataset) if num_examples is None else int(num_examples), "dp-epsilon": float(eps), "dp-delta": float(delta),
        "dp-steps": int(dp_optimizer.steps), "dp-budget-exhausted": exhausted})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)
