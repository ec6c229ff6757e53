"""``torch.compile(private_model)``: the private forward (capture, records probe, parameter watch)
runs eagerly inside the compiled call (``torch.compiler.disable`` on PrivateModule.forward), so a
compiled step equals the eager one and every refusal still happens. Before, the compiled probe's
backward reached the watch's hooks with gradients None (TypeError)."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine


class _Rnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _Mixing(nn.Module):
    """Each record's output reads the batch mean: records are mixed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0, keepdim=True)


def _private(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.zeros(4)), batch_size=4),
            noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False)[:2]


def _train(make, x, compiled):
    torch.manual_seed(0)
    model = make()
    private, opt = _private(model)
    f = torch.compile(private) if compiled else private
    y = torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(f(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_compiled_private_step_equals_eager(kind):
    torch._dynamo.reset()
    if kind == "mlp":
        make, x = (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))), torch.randn(4, 3)
    else:
        make, x = _Rnn, torch.randn(4, 5, 3)
    eager = _train(make, x, False)
    compiled = _train(make, x, True)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_compiled_private_model_still_refuses_mixed_records():
    torch._dynamo.reset()
    private, opt = _private(_Mixing())
    f = torch.compile(private)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    opt.zero_grad()
    nn.functional.cross_entropy(f(x), y).backward()
    with pytest.raises(Exception, match="not records|mix"):
        opt.step()
