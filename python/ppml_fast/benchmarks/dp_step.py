"""Benchmark cases of one DP-SGD step (issue 4, item 8) against non-private torch and Opacus 1.6,
in the same run, on the three models of ../shared/ANCHORS.md:

- ``dp-step-mlp``: M1, MLP 784-512-256-10, batch 256;
- ``dp-step-cnn``: M2, Opacus's MNIST example CNN (``SampleConvNet``) on 1x28x28, batch 256;
- ``dp-step-text``: M3, Embedding(10000, 128) + 2 TransformerEncoderLayer(128, 4 heads, ff 256,
  dropout 0.1 — torch's default, the same for every impl) + Linear(128, 10) on the mean over 64
  tokens, batch 32.

Each impl times ONE full step on a fixed batch (no data loader in the timed region): zero_grad,
forward, cross-entropy (mean), backward, ``optimizer.step()`` with SGD(lr=0.05). Every impl builds
its own copy of the model from the same seed. Noise multiplier 1.0, max_grad_norm 1.0, fixed
batches (``poisson_sampling=False``, as ANCHORS.md measured Opacus).

Roles and ratios (``ppml_fast.benchmarks.run``):
- ``ppml_ghost`` (ppml_fast ``PrivacyEngine``, ``grad_sample_mode="ghost"``) is the impl every
  other row is compared with; ``ppml_materialize`` (per-sample gradients everywhere, the reference
  path) is a second ppml_fast row: its time is shown, without a ratio;
- ``nonprivate`` (plain torch) is a ``floor``: its ratio is ppml_ghost ms / non-private ms, target
  ``<= 1.20x`` (issue 4);
- Opacus impls are ``baseline`` s: ratio Opacus ms / ppml_ghost ms, target ``>= 1.00x`` (ppml_fast
  faster than every Opacus mode). On M3 Opacus refuses plain ``nn.MultiheadAttention`` in every
  mode: ``opacus_hooks`` and ``opacus_ghost`` are error rows there, and ``opacus_*_dpmha`` run the
  same model with ``opacus.validators.ModuleValidator.fix`` (Opacus's ``DPMultiheadAttention``).
Opacus is imported only inside the impls: without it those rows are errors (or skips in bench/).

Device (:mod:`ppml_fast.benchmarks.device`): ``dp_step_cases(sizes, device="cuda")`` (or
``PPML_BENCH_DEVICE=cuda`` in the environment, e.g. for ``bench/bench_dp_step.py``, or
``ppml-fast bench --device cuda``) builds the same models (on the CPU from the same seed, then
moved), batches and impls on the GPU; every impl runs there, baselines included, and each timed
step ends with ``torch.cuda.synchronize()``.

Peak memory: on the CPU, :func:`peak_memory_table` runs each impl in a fresh Python process and
reports the growth of the resident set (Linux ``VmHWM`` after ``reset`` through
``/proc/self/clear_refs``, minus ``VmRSS`` just before the first step) over a few steps, model and
inputs already built:
what a step adds (activations, captured tensors, per-sample gradients, gradients, noise) as the
OS sees it, torch's CPU allocations included (tracemalloc does not see those). It includes the
one-off allocations of a process's first step (thread pools, autograd; 8-25 MiB for plain torch
on the tiny cases here): read each row against the non-private row of its case. On CUDA it reports
torch's allocator statistics instead, in this process: ``torch.cuda.max_memory_allocated()``
over the steps (reset first) minus ``torch.cuda.memory_allocated()`` before the first step, model
and inputs already on the GPU (exact bytes of live tensors; no one-off costs, no fresh process
needed). Run ``python -m ppml_fast.benchmarks.dp_step --memory [--sizes tiny] [--device cuda]
[--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ppml_fast.benchmarks.cases import Case, Impl, Inputs, Target
from ppml_fast.benchmarks.device import DEVICE_ENV, DEVICES, bench_device

NOISE, MAX_GRAD_NORM, LR, SEED = 1.0, 1.0, 0.05, 0
GHOST_TARGET = Target("<=", 1.2)  # ppml_fast ghost / non-private
OPACUS_TARGET = Target(">=", 1.0)  # Opacus / ppml_fast ghost

SIZES: dict[str, dict[str, dict]] = {
    "full": {
        "mlp": {"batch": 256, "widths": (784, 512, 256, 10)},
        "cnn": {"batch": 256},
        "text": {"batch": 32, "vocab": 10_000, "d": 128, "heads": 4, "ff": 256, "seq": 64,
                 "dropout": 0.1},
    },
    # Seconds, for tests of the harness; the targets mean nothing at these sizes.
    "tiny": {
        "mlp": {"batch": 8, "widths": (64, 32, 16, 10)},
        "cnn": {"batch": 4},
        "text": {"batch": 4, "vocab": 100, "d": 16, "heads": 2, "ff": 32, "seq": 8, "dropout": 0.1},
    },
}


# -- models ---------------------------------------------------------------------------------------
class SampleConvNet(nn.Module):
    """Opacus's MNIST example model (opacus/examples/mnist.py), unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)  # (B, 16, 13, 13)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)  # (B, 32, 4, 4)
        x = x.view(-1, 32 * 4 * 4)
        return self.fc2(F.relu(self.fc1(x)))


class TextTransformer(nn.Module):
    """Embedding, encoder layers (plain ``nn.MultiheadAttention``), token mean, linear head."""

    def __init__(self, vocab: int, d: int, heads: int, ff: int, layers: int = 2,
                 classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=dropout, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embedding(tokens)
        for layer in self.encoder:
            h = layer(h)
        return self.head(h.mean(dim=1))


def _mlp(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _setup(model: str, sizes: str, device: str = "cpu") -> Callable[[], Inputs]:
    s = SIZES[sizes][model]

    def setup() -> Inputs:
        g = torch.Generator().manual_seed(SEED)
        b = s["batch"]
        if model == "mlp":
            x = torch.randn(b, s["widths"][0], generator=g)
            build = lambda: _mlp(s["widths"])  # noqa: E731
        elif model == "cnn":
            x = torch.randn(b, 1, 28, 28, generator=g)
            build = SampleConvNet
        else:
            x = torch.randint(0, s["vocab"], (b, s["seq"]), generator=g)
            build = lambda: TextTransformer(s["vocab"], s["d"], s["heads"], s["ff"],  # noqa: E731
                                            dropout=s["dropout"])
        y = torch.randint(0, 10, (b,), generator=g)  # drawn on the CPU: the same data anywhere
        return {"x": x.to(device), "y": y.to(device), "batch": b, "build": build,
                "device": device}

    return setup


def _model(x: Inputs, prepare: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """The case's model with the same initial weights for every impl (built on the CPU, then
    ``prepare``d, e.g. Opacus's module fixer, which builds its replacements on the CPU), on the
    case's device."""
    torch.manual_seed(SEED)
    net = x["build"]()
    if prepare is not None:
        net = prepare(net)
    return net.to(x.get("device", "cpu")).train()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR)


def _loop(model: nn.Module, opt, loss_fn, x: torch.Tensor, y: torch.Tensor):
    """The timed step: zero_grad, forward, loss, backward, step; returns the loss (detached).
    On CUDA it waits for the GPU before returning, so that a wall-clock timer sees the work."""
    sync = x.device.type == "cuda"

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if sync:
            torch.cuda.synchronize(x.device)
        return loss.detach()

    return step


# -- impls ----------------------------------------------------------------------------------------
def _nonprivate(x: Inputs):
    model = _model(x)
    return _loop(model, _sgd(model), F.cross_entropy, x["x"], x["y"])


def _loader(x: Inputs):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(x["x"], x["y"]), batch_size=x["batch"])


def _ppml(mode: str):
    def make(x: Inputs):
        from ppml_fast.privacy import PrivacyEngine

        net = _model(x)
        with warnings.catch_warnings():  # poisson_sampling=False warns about the reported epsilon
            warnings.simplefilter("ignore")
            model, opt, _ = PrivacyEngine().make_private(
                module=net, optimizer=_sgd(net), data_loader=_loader(x), noise_multiplier=NOISE,
                max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode=mode,
                noise_seed=SEED)
        return _loop(model, opt, F.cross_entropy, x["x"], x["y"])

    return make


def _opacus(mode: str, *, fix: bool = False):
    def make(x: Inputs):
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        # fix: nn.MultiheadAttention -> opacus.layers.DPMultiheadAttention (same weights)
        net = _model(x, ModuleValidator.fix if fix else None)
        kwargs = {"criterion": nn.CrossEntropyLoss()} if mode == "ghost" else {}
        with warnings.catch_warnings():  # secure-RNG and fixed-batch warnings
            warnings.simplefilter("ignore")
            out = PrivacyEngine().make_private(
                module=net, optimizer=_sgd(net), data_loader=_loader(x), noise_multiplier=NOISE,
                max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False, grad_sample_mode=mode,
                **kwargs)
        if mode == "ghost":  # (module, optimizer, criterion, loader): the criterion runs the
            model, opt, criterion, _ = out  # two backward passes of ghost clipping
        else:
            (model, opt, _), criterion = out, F.cross_entropy
        return _loop(model, opt, criterion, x["x"], x["y"])

    return make


def _impls(text: bool) -> tuple[Impl, ...]:
    impls = [
        Impl("ppml_ghost", "ppml_fast ghost/book-keeping", _ppml("ghost"), role="ppml_fast"),
        Impl("ppml_materialize", "ppml_fast materialised", _ppml("materialize"), role="ppml_fast"),
        Impl("nonprivate", "non-private torch SGD", _nonprivate, role="floor",
             versus="ppml_ghost", target=GHOST_TARGET),
        Impl("opacus_hooks", "Opacus 1.6 hooks", _opacus("hooks"), target=OPACUS_TARGET),
        Impl("opacus_ghost", "Opacus 1.6 ghost", _opacus("ghost"), target=OPACUS_TARGET),
    ]
    if text:
        impls += [
            Impl("opacus_hooks_dpmha", "Opacus 1.6 hooks, DPMultiheadAttention",
                 _opacus("hooks", fix=True), target=OPACUS_TARGET),
            Impl("opacus_ghost_dpmha", "Opacus 1.6 ghost, DPMultiheadAttention",
                 _opacus("ghost", fix=True), target=OPACUS_TARGET),
        ]
    return tuple(impls)


def dp_step_cases(sizes: str = "full", device: Optional[str] = None) -> list[Case]:
    """One case per model (``"tiny"``: small models and batches, for tests of the harness) on
    ``device`` ("cpu" or "cuda"; default ``$PPML_BENCH_DEVICE``, else "cpu"; see
    :func:`bench_device`). The keys do not depend on the device; on CUDA the names end in
    ``[cuda]``."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(map(repr, SIZES))}; got {sizes!r}")
    device = bench_device(device)
    on = "" if device == "cpu" else f" [{device}]"
    s = SIZES[sizes]
    mlp, cnn, text = s["mlp"], s["cnn"], s["text"]
    widths = "-".join(map(str, mlp["widths"]))
    return [
        Case("dp-step-mlp", f"DP step M1 MLP {widths}, batch {mlp['batch']}{on}",
             _setup("mlp", sizes, device), _impls(False)),
        Case("dp-step-cnn", f"DP step M2 MNIST CNN 1x28x28, batch {cnn['batch']}{on}",
             _setup("cnn", sizes, device), _impls(False)),
        Case("dp-step-text",
             f"DP step M3 Emb {text['vocab']}x{text['d']} + 2 enc ({text['heads']} heads, ff "
             f"{text['ff']}), seq {text['seq']}, batch {text['batch']}{on}",
             _setup("text", sizes, device), _impls(True)),
    ]


# -- peak memory ----------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))


def _measure_here(case_key: str, impl_key: str, sizes: str, steps: int,
                  device: Optional[str] = None) -> dict:
    """In this process: build the case and impl, then the peak memory growth over ``steps``
    steps: of the resident set on the CPU, of torch's CUDA allocator on CUDA."""
    case = next(c for c in dp_step_cases(sizes, device) if c.key == case_key)
    impl = next(i for i in case.impls if i.key == impl_key)
    inputs = case.setup()
    cuda = inputs["device"] == "cuda"
    try:
        fn = impl.make(inputs)
    except ImportError as e:  # a baseline whose package is missing
        from ppml_fast.benchmarks.run import not_installed

        return {"error": not_installed(e)}
    except Exception as e:  # a baseline that refuses the model
        return {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"}
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            fn()  # synchronises
        peak = torch.cuda.max_memory_allocated()
        mib = 1024 * 1024
        return {"memory": "cuda", "before_mb": before / mib, "peak_mb": peak / mib,
                "growth_mb": (peak - before) / mib, "error": None}
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    for _ in range(steps):
        fn()
    peak = _status_kib("VmHWM")
    return {"memory": "rss", "rss_before_mb": before / 1024, "before_mb": before / 1024,
            "peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024, "error": None}


def peak_rss(case_key: str, impl_key: str, sizes: str = "full", steps: int = 3,
             timeout: float = 600.0, device: Optional[str] = None) -> dict:
    """Peak memory growth (MiB) of ``steps`` steps of one impl, measured in a fresh process.

    Returns ``{"memory", "before_mb", "peak_mb", "growth_mb", "error"}`` (error: why it could
    not run, the other fields then absent; on the CPU also ``rss_before_mb``). ``memory`` says
    what was measured: "rss" (the CPU: Linux only, ``/proc``) or "cuda" (``device="cuda"`` or
    ``$PPML_BENCH_DEVICE=cuda``: torch's allocator, see :func:`peak_memory`).
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "ppml_fast.benchmarks.dp_step", "--child", case_key, impl_key,
           "--sizes", sizes, "--steps", str(steps)]
    if device is not None:
        cmd += ["--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory(case_key: str, impl_key: str, sizes: str = "full", steps: int = 3,
                device: Optional[str] = None) -> dict:
    """:func:`peak_rss` on the CPU (a fresh process per impl); on CUDA the same measurement in
    this process, since torch's allocator statistics are reset per impl and count only live
    tensors (no process-wide one-off costs to keep out)."""
    if bench_device(device) == "cuda":
        return _measure_here(case_key, impl_key, sizes, steps, "cuda")
    return peak_rss(case_key, impl_key, sizes, steps, device="cpu")


def peak_memory_table(sizes: str = "full", steps: int = 3,
                      cases: Optional[list[Case]] = None,
                      device: Optional[str] = None) -> list[dict]:
    """:func:`peak_memory` of every impl of every case: rows with ``case``, ``impl`` and its
    fields. ``cases`` (default: all) are looked up by key on ``device``."""
    rows = []
    for case in cases if cases is not None else dp_step_cases(sizes, device):
        for impl in case.impls:
            r = peak_memory(case.key, impl.key, sizes, steps, device)
            rows.append({"case": case.name, "case_key": case.key, "impl": impl.name,
                         "impl_key": impl.key, **r})
    return rows


_MEMORY_NOTES = {
    "rss": "peak RSS growth: VmHWM over the steps (reset first) minus VmRSS before the first "
           "step, model and inputs built; one fresh process per impl (first-step one-offs "
           "included: compare with the non-private row).",
    "cuda": "peak CUDA growth: torch.cuda.max_memory_allocated() over the steps (reset first) "
            "minus torch.cuda.memory_allocated() before the first step, model and inputs on the "
            "GPU (live tensors only; the caching allocator's reserve is not counted).",
}


def format_peak_memory(rows: list[dict]) -> str:
    """Aligned text of :func:`peak_memory_table` rows."""
    kinds = [k for k in _MEMORY_NOTES if any(r.get("memory", "rss") == k
                                             for r in rows if not r.get("error"))] or ["rss"]
    what = {"rss": "peak RSS growth MiB", "cuda": "peak CUDA growth MiB"}
    head = ("case", "implementation", " / ".join(what[k] for k in kinds), "before MiB")
    cells = [head] + [
        (str(r["case"]), str(r["impl"]),
         (_short(r["error"]) if r.get("error") else f"{r['growth_mb']:.1f}"),
         "-" if r.get("error") else f"{r.get('before_mb', r.get('rss_before_mb')):.0f}")
        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) if i >= 2 else v.ljust(w)
                       for i, (v, w) in enumerate(zip(c, widths))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.extend(_MEMORY_NOTES[k] for k in kinds)
    lines.extend(("" if _short(r["error"]) == "not installed" else "failed: ")
                 + f"{r['impl']} at {r['case']}: {r['error']}" for r in rows if r.get("error"))
    return "\n".join(lines)


def _short(error: str) -> str:
    """A memory cell's text for a row that has no number: 'not installed' or 'failed'."""
    return "not installed" if str(error).startswith("not installed") else "failed"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppml_fast.benchmarks.dp_step",
                                description="Peak memory of one DP-SGD step per impl.")
    p.add_argument("--memory", action="store_true", help="print the peak memory table")
    p.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--sizes", choices=tuple(SIZES), default="full")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", choices=DEVICES, default=None,
                   help=f"where the models run (default: ${DEVICE_ENV}, else cpu)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_measure_here(a.child[0], a.child[1], a.sizes, a.steps, a.device)))
        return 0
    if a.memory:
        try:
            device = bench_device(a.device)
        except ValueError as e:
            print(f"{p.prog}: {e}", file=sys.stderr)
            return 2
        rows = peak_memory_table(a.sizes, a.steps, device=device)
        if a.json:
            meta = {"device": device, "torch": torch.__version__, "sizes": a.sizes,
                    "steps": a.steps, "torch_threads": torch.get_num_threads()}
            if device == "cuda":
                meta["gpu"] = torch.cuda.get_device_name()
            print(json.dumps({"meta": meta, "results": rows}, indent=2))
        else:
            print(f"torch threads: {torch.get_num_threads()}, sizes: {a.sizes}, steps: {a.steps}, "
                  f"device: {device}")
            print(format_peak_memory(rows))
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
