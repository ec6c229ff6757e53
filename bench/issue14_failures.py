"""Issue 14's closing-note measurements on the current tree (python bench/issue14_failures.py):
each numbered failure's ||Delta||/C after the fix (or the refusal's message), and check_sensitivity on three models."""
import copy
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.checkpoint import checkpoint

from ppml_fast import PrivacyEngine
from ppml_fast.audit import check_sensitivity

warnings.simplefilter("ignore")
C = 1.0


def step_sum(model, x, y, loss, **kw):
    """clipped sum of one step (noise 0) or the refusal message."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dl = DataLoader(TensorDataset(torch.arange(len(y))), batch_size=len(y))
    try:
        pm, o, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=dl, noise_multiplier=0.0,
                                                max_grad_norm=C, poisson_sampling=False, loss_reduction="sum", **kw)
        o.zero_grad()
        loss(pm(x), y).backward()
        o.step()
    except Exception as e:  # noqa: BLE001
        return f"refused: {type(e).__name__}: {str(e)[:160]}"
    return torch.cat([p.grad.flatten().double() * len(y) for p in model.parameters() if p.requires_grad])


def ratio(model, x, y, loss, drop, **kw):
    a = step_sum(model, x, y, loss, **kw)
    keep = [i for i in range(len(y)) if i != drop]
    b = step_sum(model, x[keep], y[keep], loss, **kw)
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else b
    return f"||Delta||/C = {float((a - b).norm()) / C:.4f}"


ce = lambda o, y: nn.functional.cross_entropy(o, y, reduction="sum")  # noqa: E731
torch.manual_seed(0)


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        b, t, d = x.shape
        return self.head(self.fc(x.reshape(b * t, d)).relu().reshape(b, t, -1).mean(1))


x = torch.randn(6, 5, 4) * 5
y = torch.randint(0, 3, (6,))
print("1a reshape (B,T,d)->(B*T,d):", ratio(Flatten(), x, y, ce, 0))
enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0))  # batch_first=False
for b, t in ((4, 6), (5, 5)):
    xs = torch.randn(t, b, 8)
    print(f"1b seq-first encoder, batch_first=True, B={b} T={t}:",
          step_sum(enc, xs, torch.zeros(t), lambda o, y: o.pow(2).sum()))


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        for p in self.head.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(self.fc(x).sum(1))


xc = torch.randn(6, 2, 4)
M = 2.0 ** 30
xc[2, 0] = torch.tensor([M, 1.0, 1.0, 1.0])
xc[2, 1] = torch.tensor([-M, 1.0, 1.0, 1.0])
for dt in (torch.float32, torch.float64):
    print(f"2 ghost cancellation record (M=2^30), {dt}:",
          ratio(Seq().to(dt), xc.to(dt), y, ce, 2, grad_sample_mode="ghost"))

print("3 distributed: see tests/privacy/test_distributed_sampling.py (2 and 3 gloo ranks)")

eng = PrivacyEngine()
m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
dl = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=16)
pm, o, pl = eng.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), data_loader=dl,
                             noise_multiplier=1.0, max_grad_norm=C)
it = iter(pl)
o.zero_grad()
for _ in range(2):
    bx, by = next(it)
    ce(pm(torch.cat([bx, bx[:0]])), torch.cat([by, by[:0]])).backward()
try:
    o.step()
    print("4 accumulation: accepted")
except Exception as e:  # noqa: BLE001
    print("4 accumulation:", f"refused: {type(e).__name__}: {str(e)[:160]}")


class Ck(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(checkpoint(lambda t: self.a(t).tanh(), x, use_reentrant=True))


m = Ck()
pm, o, _ = PrivacyEngine().make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                                        data_loader=dl, noise_multiplier=1.0, max_grad_norm=C)
xx = torch.randn(6, 4, requires_grad=True)
o.zero_grad()
(ce(pm(xx[:3]), y[:3]) + ce(pm(xx[3:]), y[3:])).backward()
try:
    o.step()
    print("5 reentrant checkpointing, two forwards: accepted")
except Exception as e:  # noqa: BLE001
    print("5 reentrant checkpointing, two forwards:", f"refused: {type(e).__name__}: {str(e)[:160]}")

try:
    PrivacyEngine().make_private(module=pm, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), data_loader=dl,
                                 noise_multiplier=1.0, max_grad_norm=C)
    print("6 second make_private: accepted")
except Exception as e:  # noqa: BLE001
    print("6 second make_private (another engine):", f"refused: {type(e).__name__}: {str(e)[:120]}")


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + x @ self.fc.weight.T


print("7c parameter used outside its module:", step_sum(Parent(), torch.randn(6, 4), y, ce))


class Pos(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.fc = nn.Embedding(10, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc((self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))).sum(1))


ids = torch.randint(0, 10, (6, 5))
print("8 default position_ids (1, T):", ratio(Pos(), ids, y, ce, 0))

print("\ncheck_sensitivity on three models:")
mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
r = check_sensitivity(mlp, nn.CrossEntropyLoss(), (torch.randn(16, 10), torch.randint(0, 3, (16,))), max_grad_norm=1.0)
print("MLP:", r.max_ratio, r.ok)
tenc = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
r = check_sensitivity(tenc, lambda o, t: o.pow(2).mean(), (torch.randn(8, 6, 16), torch.zeros(8)),
                      max_grad_norm=1.0, neighbours="replace")
print("TransformerEncoderLayer (replace):", r.max_ratio, r.ok)
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

g = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16))
ids = torch.randint(0, 64, (6, 8))
r = check_sensitivity(g, lambda out: out.loss, ({"input_ids": ids, "labels": ids}, None), max_grad_norm=1.0)
print("GPT-2 tiny:", r.max_ratio, r.ok)
print(r)
