"""The ClientApp: plain local training (numpy), or record-level DP-SGD through ppml_fast's
``dp_train`` when the round's config says ``mode = "dp-sgd"`` (torch imported only then)."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ppml_flower_app import task

app = ClientApp()


def _arrays(msg: Message) -> dict:
    record = msg.content["arrays"]
    return {k: record[k].numpy() for k in task.KEYS}


def _dp_sgd(msg: Message, context: Context, pid: int) -> Message:
    import torch

    from ppml_fast.integrations.flower import dp_train

    torch.set_num_threads(1)
    x, y = task.load_data(pid)
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    model = torch.nn.Linear(8, 3)
    return dp_train(msg, context, model=model, data_loader=torch.utils.data.DataLoader(data, batch_size=16),
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                    noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                    num_examples=task.num_examples(pid))


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    if config.get("mode", "plain") == "dp-sgd":
        return _dp_sgd(msg, context, pid)
    x, y = task.load_data(pid)
    new = task.train(_arrays(msg), x, y, server_round=int(config["server-round"]))
    metrics = MetricRecord({"num-examples": task.num_examples(pid), "node-partition": pid})
    arrays = ArrayRecord({k: Array(new[k]) for k in task.KEYS})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    x, y = task.load_data(int(context.node_config["partition-id"]))
    loss, acc = task.evaluate(_arrays(msg), x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
