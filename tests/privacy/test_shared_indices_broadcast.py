"""An embedding called on indices shared by the batch (leading size 1) is expanded to one row per
record inside a private forward (PrivateModule._broadcast). Where the model does not broadcast
that output over the records (peft's prompt tuning repeats a (1, P, d) prompt B times), the
records probe sees the outputs change (or the forward fail) and the layout keeps its indices as
they are: the forward gives the model's own outputs, the step is refused by name, nothing moves.
Where the model does broadcast it (position ids (1, T) added to (B, T, d)), nothing is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine, PrivacyError


class Prompted(nn.Module):
    def __init__(self, use: str) -> None:
        super().__init__()
        self.prompt, self.fc, self.use = nn.Embedding(3, 4), nn.Linear(4, 2), use

    def forward(self, x):
        p = self.prompt(torch.arange(3).unsqueeze(0))  # (1, 3, 4), shared by the records
        if self.use == "repeat":  # peft PromptTuning
            return self.fc(torch.cat([p.repeat(x.shape[0], 1, 1), x], 1)).mean(1)
        if self.use == "sum":  # a shared (2,) term
            return self.fc(x).mean(1) + self.fc(p).sum(0).mean(0)
        return self.fc(x + p.mean(1, keepdim=True)).mean(1)  # broadcast over the records


def _private(model):
    data = TensorDataset(torch.randn(8, 2, 4), torch.randint(0, 2, (8,)))
    return PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=0.0, max_grad_norm=1.0,
        poisson_sampling=False)


@pytest.mark.parametrize("use", ["repeat", "sum"])
def test_shared_output_not_broadcast_keeps_the_forward_and_refuses_the_step(use):
    torch.manual_seed(0)
    model = Prompted(use)
    x, y = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 1, 0])
    want = model(x).detach()
    before = [p.detach().clone() for p in model.parameters()]
    m, opt, _ = _private(model)
    for _ in range(2):  # the probed forward, then a forward of the verified layout
        opt.zero_grad()
        out = m(x)
        torch.testing.assert_close(out.detach(), want)
        F.cross_entropy(out, y).backward()
        with pytest.raises(PrivacyError, match=r"prompt \(Embedding\).*shared by all records"):
            opt.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_shared_output_broadcast_over_the_records_matches_the_per_record_reference():
    torch.manual_seed(0)
    model = Prompted("broadcast").double()
    ref = Prompted("broadcast").double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    want = model(x).detach()
    m, opt, _ = _private(model)
    out = m(x)
    torch.testing.assert_close(out.detach(), want)
    F.cross_entropy(out, y).backward()
    opt.step()
    # float64 reference: each record's gradient of all parameters, clipped to C = 1, averaged
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in range(4):
        ref.zero_grad()
        F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1]).backward()
        g = [p.grad for p in ref.parameters()]
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        for acc, t in zip(total, g):
            acc += t * min(1.0, 1.0 / float(norm)) / 4
    for p0, p1, t in zip(ref.parameters(), model.parameters(), total):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.1 * t, rtol=1e-6, atol=1e-9)  # norms are rounded up (bounds)
