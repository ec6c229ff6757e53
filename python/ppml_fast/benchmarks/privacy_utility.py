"""The privacy-utility table of issue 19: test accuracy at epsilon in {1, 3, 8} (delta 1e-5) of
DP-SGD (Poisson), DP-SGD (shuffled fixed-size batches, honest epsilon), tree aggregation (DP-FTRL)
and banded matrix factorization (fixed order; amplified cyclic Poisson), on sklearn's digits
with an MLP and on a generated text task with Embedding + nn.LSTM; plus, per method, a one-run
audit (:mod:`ppml_fast.benchmarks.privacy_audit`) and the epsilon cross-checked against
dp_accounting where it can express the same event.

Protocol: every run is calibrated by ``make_private_with_epsilon`` to the target (pld
accountant, epochs, batch size and clipping norm 1 the same for all methods); SGD with momentum
0.9; the learning rate of each (method, epsilon) is the best of ``lrs`` on a validation split
(one seed), then ``seeds`` seeds train on the training split and report test accuracy. The
noise key comes from OS entropy (runs are not bit-reproducible; data order and model
initialisation are seeded). ``python bench/privacy_utility.py`` or ``ppml-fast bench --only
privacy-utility`` (``--quick``: the CI size).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ppml_fast.benchmarks import privacy_audit
from ppml_fast.privacy import PrivacyEngine

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)


@dataclasses.dataclass(frozen=True)
class Method:
    """One noise mechanism with the participation it is accounted for."""
    key: str
    label: str
    options: dict  # make_private keywords
    shuffle: bool  # the user's DataLoader(shuffle=)
    audit_kind: str  # privacy_audit participation kind


def methods(steps_per_epoch: int, cyclic_bands: int = 4) -> list[Method]:
    """The compared methods; BandMF fixed order uses b = K bands (steps per epoch: columns of C
    never overlap within a record's participations, S = epochs), cyclic Poisson ``cyclic_bands``."""
    b = min(cyclic_bands, steps_per_epoch)
    return [
        Method("dpsgd_poisson", "DP-SGD, Poisson", {}, False, "poisson"),
        Method("dpsgd_shuffle", "DP-SGD, shuffled batches (honest eps)", {"poisson_sampling": False},
               True, "shuffled"),
        Method("tree", "DP-FTRL tree, fixed order", {"poisson_sampling": False, "noise_mechanism": "tree"},
               False, "every_epoch"),
        Method("bandmf_fixed", f"BandMF b={steps_per_epoch}, fixed order",
               {"poisson_sampling": False, "noise_mechanism": "banded_mf", "bands": steps_per_epoch},
               False, "every_epoch"),
        Method("bandmf_cyclic", f"BandMF b={b}, cyclic Poisson",
               {"poisson_sampling": True, "noise_mechanism": "banded_mf", "bands": b}, False,
               "cyclic_poisson"),
    ]


@dataclasses.dataclass
class Task:
    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    model_fn: Callable[[], nn.Module]
    batch_size: int
    epochs: int
    lrs: tuple


def _split(ds: TensorDataset, fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = ds.tensors
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    k = int(round(len(y) * fraction))
    return TensorDataset(x[perm[k:]], y[perm[k:]]), TensorDataset(x[perm[:k]], y[perm[:k]])


def digits_task(*, epochs: int = 10, batch_size: int = 64, lrs=(0.1, 0.3, 1.0), limit: Optional[int] = None) -> Task:
    """sklearn's digits (train 1,222 / validation 216 / test 359) with a 64-64-10 MLP."""
    from ppml_fast.audit import digits_mlp
    from ppml_fast.datasets import digits

    train, test = digits(seed=0)
    train, val = _split(train, 0.15, 1)
    if limit:
        train = TensorDataset(*(t[:limit] for t in train.tensors))
    return Task("digits", train, val, test, digits_mlp, batch_size, epochs, tuple(lrs))


class LSTMClassifier(nn.Module):
    """Embedding -> one-layer nn.LSTM -> linear on the last hidden state."""

    def __init__(self, vocab: int = 16, dim: int = 16, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


def token_counts(n: int, *, length: int = 12, vocab: int = 16, seed: int = 0) -> TensorDataset:
    """``n`` sequences of token ids; the label (0, 1, 2) is whichever of tokens 1, 2, 3 occurs
    most often (sequences with a tie are redrawn): a counting task an order-blind bag of
    embeddings cannot read off one position."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, have = [], [], 0
    while have < n:
        x = torch.randint(0, vocab, (2 * n, length), generator=g)
        counts = torch.stack([(x == k).sum(1) for k in (1, 2, 3)], 1)
        top = counts.max(1)
        ok = (counts == top.values[:, None]).sum(1) == 1
        xs.append(x[ok])
        ys.append(top.indices[ok])
        have += int(ok.sum())
    return TensorDataset(torch.cat(xs)[:n], torch.cat(ys)[:n])


def text_task(*, epochs: int = 8, batch_size: int = 64, lrs=(0.3, 1.0, 3.0), n: int = 1536) -> Task:
    """The generated counting task (:func:`token_counts`): n train, n/5 validation, n/2 test."""
    data = token_counts(n + n // 5 + n // 2, seed=19)
    x, y = data.tensors
    a, b = n, n + n // 5
    return Task("text", TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]),
                TensorDataset(x[b:], y[b:]), LSTMClassifier, batch_size, epochs, tuple(lrs))


def _accuracy(model: nn.Module, ds: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = ds.tensors
        return float((model(x).argmax(1) == y).float().mean())


def train_once(task: Task, method: Method, epsilon: float, lr: float, seed: int, *, evaluate: TensorDataset,
               sigma: Optional[float] = None, canaries: int = 0) -> dict:
    """One training: calibrated by ``make_private_with_epsilon`` (or ``make_private`` with the
    ``sigma`` it found before, the same call with the search skipped); with ``canaries`` > 0 a
    one-run audit of the same run."""
    torch.manual_seed(seed)
    model = task.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(task.train, batch_size=task.batch_size, shuffle=method.shuffle,
                        generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="pld")
    kw = dict(method.options)
    if kw.get("poisson_sampling", True):
        kw["generator"] = torch.Generator().manual_seed(seed + 1)
    if canaries:
        kw["optimizer_class"] = privacy_audit.CanaryDPOptimizer
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # poisson_sampling=False warns: chosen here
        if sigma is None:
            model_p, dp_opt, dl = engine.make_private_with_epsilon(
                module=model, optimizer=opt, data_loader=loader, target_epsilon=epsilon,
                target_delta=DELTA, epochs=task.epochs, max_grad_norm=1.0, **kw)
        else:
            if "noise_mechanism" in kw:
                kw["epochs"] = task.epochs
            model_p, dp_opt, dl = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=1.0, **kw)
    calib_s = time.perf_counter() - t0
    K = len(dl)
    T = task.epochs * K
    audit = None
    if canaries:
        rng = np.random.default_rng(seed + 7)
        included = rng.random(canaries) < 0.5
        params = [p for p in model.parameters() if p.requires_grad]
        cset = privacy_audit.DiracCanaries.draw(params, canaries, torch.Generator().manual_seed(seed + 9))
        parts = method.options.get("bands", 1) if method.audit_kind == "cyclic_poisson" else 1
        joins, known = privacy_audit.plan_joins(method.audit_kind, steps=T, canaries=canaries,
                                                included=included, rng=rng, steps_per_epoch=K,
                                                sample_rate=dp_opt.sample_rate, parts=parts)
        dp_opt.setup_canaries(cset, joins)
    t0 = time.perf_counter()
    model_p.train()
    for _ in range(task.epochs):
        for x, y in dl:
            dp_opt.zero_grad()
            F.cross_entropy(model_p(x), y).backward()
            dp_opt.step()
    train_s = time.perf_counter() - t0
    if canaries:
        audit = privacy_audit.audit_run(dp_opt, method.audit_kind, known, included, delta=DELTA,
                                        sample_rate=dp_opt.sample_rate, parts=parts)
    acc = _accuracy(model_p, evaluate)
    out = {"task": task.name, "method": method.key, "target_epsilon": epsilon, "lr": lr, "seed": seed,
           "accuracy": acc, "sigma": float(dp_opt.noise_multiplier), "epsilon": float(engine.get_epsilon(DELTA)),
           "steps": dp_opt.steps, "steps_per_epoch": K, "sample_rate": float(dp_opt.sample_rate),
           "analysis": engine.accounting_analysis, "calibrate_s": calib_s, "train_s": train_s,
           "crosscheck": crosscheck(method, dp_opt, task.epochs)}
    if audit is not None:
        out["audit"] = audit
    model_p.remove_hooks()
    return out


def crosscheck(method: Method, dp_opt, epochs: int) -> dict:
    """The run's epsilon at DELTA from ppml_fast's PLD accountant on the event the method is
    accounted as, and from dp_accounting 0.6's PLD on the same event (None: not installed):
    PoissonSampled Gaussian x T; Gaussian(sigma) x epochs (shuffled, zero-out); one
    Gaussian(sigma / sqrt(S)) (fixed-order tree / BandMF); cyclic Poisson: PoissonSampled(q,
    Gaussian(sigma / zeta)) x ceil(T / b) (jax_privacy's amplified BandMF event)."""
    from ppml_fast.accounting import GaussianEvent, PLDAccountant, PoissonSampledEvent, SelfComposedEvent

    sigma, T, q = float(dp_opt.noise_multiplier), int(dp_opt.steps), float(dp_opt.sample_rate)
    corr = dp_opt.correlated
    if corr is None and method.options.get("poisson_sampling", True):
        base, count, what = (q, sigma), T, f"PoissonSampled(q={q:.4g}, Gaussian({sigma:.4g})) x {T}"
    elif corr is None:
        base, count, what = (None, sigma), epochs, f"Gaussian({sigma:.4g}) x {epochs}"
    elif corr.participation.kind == "cyclic_poisson":
        b, zeta = corr.participation.min_separation, corr.strategy.max_column_norm()
        count = -(-T // b)
        base = (corr.participation.sample_rate, sigma / zeta)
        what = f"PoissonSampled(q={base[0]:.4g}, Gaussian({base[1]:.4g})) x {count}"
    else:
        S = corr.strategy.sensitivity_sq_prefix(corr.steps - 1, corr.participation)
        base, count, what = (None, sigma / math.sqrt(S)), 1, f"Gaussian({sigma:.4g}/sqrt(S={S:.4g}))"
    q_, s_ = base
    ev = GaussianEvent(s_) if q_ is None else PoissonSampledEvent(q_, GaussianEvent(s_))
    ours = PLDAccountant().compose(SelfComposedEvent(ev, count) if count > 1 else ev).get_epsilon(DELTA)
    try:
        import dp_accounting
        from dp_accounting.pld import PLDAccountant as DPPLD

        dev = dp_accounting.GaussianDpEvent(s_)
        if q_ is not None:
            dev = dp_accounting.PoissonSampledDpEvent(q_, dev)
        theirs = DPPLD().compose(dp_accounting.SelfComposedDpEvent(dev, count)).get_epsilon(DELTA)
    except ImportError:
        theirs = None
    return {"event": what, "ppml_fast_pld": float(ours), "dp_accounting_pld": theirs}


def run(tasks: list[Task], *, epsilons=EPSILONS, seeds=(0, 1, 2), audit_canaries: int = 1000,
        audit_tasks=("digits",), cyclic_bands: int = 4,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """The whole benchmark: per task, method and epsilon the learning rate picked on the
    validation split (seed 0), then ``seeds`` runs on test, and a one-run audit (separate run,
    ``audit_canaries`` canaries, tasks in ``audit_tasks``). Returns {"runs": [...], "rows": [...]}."""
    runs, rows = [], []
    for task in tasks:
        K = -(-len(task.train) // task.batch_size)
        for method in methods(K, cyclic_bands):
            for eps in epsilons:
                sigma, best = None, None
                for lr in task.lrs if len(task.lrs) > 1 else ():  # one value: nothing to pick
                    r = train_once(task, method, eps, lr, 0, evaluate=task.val, sigma=sigma)
                    sigma = r["sigma"]  # found by make_private_with_epsilon on the first call
                    r["split"] = "val"
                    runs.append(r)
                    if best is None or r["accuracy"] > best["accuracy"]:
                        best = r
                lr = task.lrs[0] if best is None else best["lr"]
                finals = []
                for s in seeds:
                    finals.append(train_once(task, method, eps, lr, s, evaluate=task.test, sigma=sigma))
                    sigma = finals[-1]["sigma"]
                for r in finals:
                    r["split"] = "test"
                runs.extend(finals)
                audit = None
                if audit_canaries and task.name in audit_tasks:
                    a = train_once(task, method, eps, lr, 100, evaluate=task.test, sigma=sigma,
                                   canaries=audit_canaries)
                    a["split"] = "audit"
                    runs.append(a)
                    audit = a["audit"]
                accs = np.array([r["accuracy"] for r in finals])
                rows.append({
                    "task": task.name, "method": method.key, "label": method.label, "target_epsilon": eps,
                    "lr": lr, "accuracy_mean": float(accs.mean()),
                    "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "seeds": len(accs),
                    "sigma": finals[0]["sigma"], "epsilon": max(r["epsilon"] for r in finals),
                    "crosscheck": finals[0]["crosscheck"], "analysis": finals[0]["analysis"],
                    "audit": audit, "steps": finals[0]["steps"]})
                if progress:
                    rw = rows[-1]
                    progress(f"{task.name} {method.key} eps={eps:g}: acc {rw['accuracy_mean']:.3f} "
                             f"+- {rw['accuracy_std']:.3f} (lr {rw['lr']:g}, sigma {rw['sigma']:.3f}, "
                             f"eps {rw['epsilon']:.3f}" + (f", audit lb {audit['epsilon_lower_bound']:.2f}"
                                                          if audit else "") + ")")
    return {"runs": runs, "rows": rows}


def audit_rows(task: Task, rows: list[dict], *, canaries: int = 1000, cyclic_bands: int = 4,
               progress: Optional[Callable[[str], None]] = None) -> None:
    """Adds to ``rows`` (of an earlier :func:`run` on ``task``, e.g. one without audits) the
    one-run audit of each, at the row's learning rate and calibrated sigma."""
    K = -(-len(task.train) // task.batch_size)
    by_key = {m.key: m for m in methods(K, cyclic_bands)}
    for r in rows:
        if r["task"] != task.name:
            continue
        a = train_once(task, by_key[r["method"]], r["target_epsilon"], r["lr"], 100, evaluate=task.test,
                       sigma=r["sigma"], canaries=canaries)
        r["audit"] = a["audit"]
        r["epsilon"] = max(r["epsilon"], a["epsilon"])
        if progress:
            progress(f"{task.name} {r['method']} eps={r['target_epsilon']:g}: audit lb "
                     f"{a['audit']['epsilon_lower_bound']:.2f} (claim {a['epsilon']:.3f})")


def format_table(result: dict) -> str:
    """Markdown: the accuracy table, the accounting cross-checks, the analyses in words."""
    rows = result["rows"]
    eps = sorted({r["target_epsilon"] for r in rows})
    out = ["| task | method | " + " | ".join(f"eps={e:g}: acc (sigma, lr)" for e in eps) + " |",
           "|---|---|" + "---|" * len(eps)]
    keys = list(dict.fromkeys((r["task"], r["method"]) for r in rows))
    by = {(r["task"], r["method"], r["target_epsilon"]): r for r in rows}
    for t, m in keys:
        cells = []
        for e in eps:
            r = by.get((t, m, e))
            cells.append("-" if r is None else f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} "
                                               f"({r['sigma']:.2f}, {r['lr']:g})")
        label = next(r["label"] for r in rows if (r["task"], r["method"]) == (t, m))
        out.append(f"| {t} | {label} | " + " | ".join(cells) + " |")
    out += ["", "| task | method | target eps | engine eps | event | ppml_fast PLD | dp_accounting PLD | "
            "audit lower bound (canaries, guesses, correct) | whitened noise var |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, a = r["crosscheck"], r["audit"]
        dp = "-" if c["dp_accounting_pld"] is None else f"{c['dp_accounting_pld']:.4f}"
        au = "-" if a is None else (f"{a['epsilon_lower_bound']:.2f} ({a['canaries']}, {a['guesses']}, "
                                    f"{a['correct']})" + (" **ABOVE CLAIM**" if a["epsilon_lower_bound"]
                                                          > r["epsilon"] else ""))
        out.append(f"| {r['task']} | {r['method']} | {r['target_epsilon']:g} | {r['epsilon']:.4f} | "
                   f"{c['event']} | {c['ppml_fast_pld']:.4f} | {dp} | {au} | "
                   + ("-" if a is None or "whitened_noise_var" not in a else f"{a['whitened_noise_var']:.4f}") + " |")
    out += ["", "accounting_analysis per method (first task, largest epsilon):"]
    seen = set()
    for r in rows:
        if r["method"] not in seen:
            seen.add(r["method"])
            out.append(f"- {r['method']}: {r['analysis']}")
    return "\n".join(out)


def main(argv=None) -> int:
    """``python -m ppml_fast.benchmarks.privacy_utility [--quick] [--json PATH]``."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: seconds")
    p.add_argument("--json", metavar="PATH", help="also write every run as JSON")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=["digits", "text"])
    p.add_argument("--audit-from", metavar="JSON", help="audit the rows of an earlier --json run "
                   "(its tasks) instead of training the table again")
    a = p.parse_args(argv)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"  [{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    builders = {"digits": lambda: digits_task(lrs=(0.1, 0.3)), "text": lambda: text_task(lrs=(0.3, 1.0))}
    if a.audit_from:
        with open(a.audit_from) as f:
            result = json.load(f)
        for name in dict.fromkeys(r["task"] for r in result["rows"]):
            audit_rows(builders[name](), result["rows"], progress=progress)
    elif a.quick:
        result = run(quick_tasks(), epsilons=(3.0,), seeds=(0,), audit_canaries=100, cyclic_bands=2,
                     progress=progress)
    else:
        result = run([builders[t]() for t in a.tasks], seeds=tuple(range(a.seeds)), progress=progress)
    print(format_table(result))
    print(f"\nwall {time.perf_counter() - start:.0f} s, delta {DELTA:g}, torch threads {torch.get_num_threads()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    bad = [r for r in result["rows"] if r["epsilon"] > r["target_epsilon"]
           or (r["audit"] and r["audit"]["epsilon_lower_bound"] > r["epsilon"])]
    for r in bad:
        print(f"FAILED: {r['task']} {r['method']} eps {r['epsilon']} target {r['target_epsilon']} "
              f"audit {r['audit']}", file=sys.stderr)
    return 1 if bad else 0


def quick_tasks() -> list[Task]:
    """CI size: 256 digits, one epoch of 4 steps, one learning rate."""
    return [digits_task(epochs=1, lrs=(0.3,), limit=256)]


if __name__ == "__main__":
    raise SystemExit(main())
