"""Ways to get an LSTM layer's gate gradients (what the DP step needs for ghost norms and
book-keeping of its weights; :mod:`ppml_fast.privacy.per_sample.recurrent`), timed against the
native layer's forward + backward, interleaved round by round in one process (thread CPU time,
median), and the whole DP step of Embedding -> LSTM -> Linear against a non-private step.

- native: ``nn.LSTM`` forward + backward (input and parameter gradients), what a non-private
  step runs;
- ppml_fast: the native forward, the gates recomputed for all steps at once, backpropagation
  through time written out (the gate gradients, the input and initial-state gradients);
- identity trick: ``U = X W_ih^T + b_ih`` by one matmul, then the native op on ``U`` with an
  identity input weight, so that autograd gives ``dL/dU`` (the gate gradients); costs a
  (4H x 4H) input matmul forward and backward;
- unrolled: ``U`` as above, then the cell's formulas step by step under autograd.

Run::

    OMP_NUM_THREADS=1 python bench/bench_recurrent.py [--rounds 30] [--threads 1]

Sizes: vocabulary 1000, embedding 64, hidden 64, 32 steps, batch 16 (issue 16's classifier).
Not a pytest file.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.privacy import PrivacyEngine
from ppml_fast.privacy.per_sample.recurrent import Direction, Layer

V, E, H, T, B = 1000, 64, 64, 32, 16


def _layer_candidates():
    lstm = nn.LSTM(E, H)
    x = torch.randn(T, B, E, requires_grad=True)
    cot = torch.randn(T, B, H)
    zeros = torch.zeros(1, B, H)
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in lstm.parameters())
    eye = torch.eye(4 * H)

    def native():
        (lstm(x)[0] * cot).sum().backward()

    def ppml_fast():
        d = Direction(w_ih, w_hh, b_ih, b_hh)
        out = Layer.apply(x, zeros, zeros, "LSTM", [d], lambda k, g: None, [], None)[0]
        (out * cot).sum().backward()

    def identity_trick():
        u = F.linear(x, w_ih, b_ih)
        u.register_hook(lambda g: None)  # where the gate gradients would be captured
        out = torch._VF.lstm(u, (zeros, zeros), [eye, w_hh, torch.zeros(4 * H), b_hh], True, 1, 0.0,
                             True, False, False)[0]
        (out * cot).sum().backward()

    def unrolled():
        u = F.linear(x, w_ih, b_ih)
        h, c, outs = zeros[0], zeros[0], []
        for t in range(T):
            i, f, g, o = torch.addmm(b_hh, h, w_hh.t()).add_(u[t]).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        (torch.stack(outs) * cot).sum().backward()

    return {"native": native, "ppml_fast": ppml_fast, "identity trick": identity_trick,
            "unrolled": unrolled}


class TextLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(V, E), nn.LSTM(E, H, batch_first=True), nn.Linear(H, 2)

    def forward(self, tokens):
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


def _step_candidates():
    torch.manual_seed(0)
    plain = TextLSTM()
    model = copy.deepcopy(plain)
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, 2, (B,))
    opt0 = torch.optim.SGD(plain.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=B), noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False)

    def non_private():
        opt0.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt0.step()

    def dp():
        opt.zero_grad()
        F.cross_entropy(private(x), y).backward()
        opt.step()

    return {"non-private step": non_private, "ppml_fast DP step": dp}


def _time(cands: dict, rounds: int) -> dict:
    for f in cands.values():  # warm-up (and the records probe of the DP step)
        f(), f()
    times = {k: [] for k in cands}
    for _ in range(rounds):
        for k, f in cands.items():
            t0 = time.thread_time()
            f()
            times[k].append(time.thread_time() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"threads {args.threads} | rounds {args.rounds} | thread CPU time, median")
    for title, cands in (("LSTM layer, forward + backward", _layer_candidates()),
                         ("Embedding -> LSTM -> Linear, one SGD step", _step_candidates())):
        ms = _time(cands, args.rounds)
        base = next(iter(ms.values()))
        print(title)
        for k, v in ms.items():
            print(f"  {k:<22} {v:8.3f} ms  {v / base:5.2f}x")


if __name__ == "__main__":
    main()
