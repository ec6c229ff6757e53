"""The ClientApp: plain local SGD, or record-level DP-SGD through ppml_fast's ``dp_train`` when
the round's config says ``mode = "dp-sgd"``."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ppml_fast.integrations.flower import dp_train
from ppml_flower_app import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    data = task.load_data(pid)
    model = task.net()
    if config.get("mode", "plain") == "dp-sgd":
        return dp_train(msg, context, model=model,
                        data_loader=torch.utils.data.DataLoader(data, batch_size=16),
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    task.train(model, data, seed=1000 * int(config["server-round"]) + pid)
    metrics = MetricRecord({"num-examples": len(data) + 16 * pid, "node-partition": pid})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = task.net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, acc = task.evaluate(model, task.load_data(int(context.node_config["partition-id"])))
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": 64})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
