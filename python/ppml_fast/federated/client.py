"""A simulated client device: it owns its data and answers ``fit`` and ``evaluate``.

The server side (strategies, the simulation's round loop) holds a
:class:`~ppml_fast.federated.types.ClientProxy` and receives only what ``fit`` and
``evaluate`` return. The data stay in the client object, which in a simulation is the
stand-in for the device (this is an API boundary for honest code, not a sandbox).

Local training (the reference that the vectorised backend reproduces): the model's floating
state is loaded from the received vector; for ``local_epochs`` epochs a permutation of the
client's examples is drawn from ``torch.Generator().manual_seed(config["seed"])`` and cut into
consecutive batches of ``batch_size`` (the last one may be smaller); each batch takes one
plain SGD step ``p -= lr * (grad of mean loss + proximal_mu * (p - p_received))`` (the
proximal term is FedProx's, Li et al. 2020, eq. 2; 0 gives FedAvg's local SGD).

With ``config["local_dp"]`` (a :class:`~ppml_fast.federated.dp.LocalDP`) the client trains with
DP-SGD instead and keeps its own accountant across rounds: :mod:`ppml_fast.federated.dp.local`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .dp.local import LocalDPState, check_local_dp, local_dp_sgd
from .parameters import ParameterLayout
from .types import EvalResult, FitResult

__all__ = ["Client", "DEFAULT_FIT_CONFIG", "evaluate_model", "fit_settings"]

#: Configuration keys of ``Client.fit`` and their defaults. ``model`` (a scratch model instance
#: of the right architecture, reused) or ``model_fn`` (builds one) is required, and ``seed``.
DEFAULT_FIT_CONFIG: dict[str, Any] = {
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.01,
    "proximal_mu": 0.0,
    "loss_fn": None,  # callable(output, target) -> mean loss; None = cross-entropy
}

_EVAL_BATCH = 4096


def _materialize(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a (nested Subset of a) TensorDataset by indexing, else by stacking."""
    indices = None
    base = dataset
    while isinstance(base, Subset):
        idx = torch.as_tensor(list(base.indices), dtype=torch.long)
        indices = idx if indices is None else idx[indices]
        base = base.dataset
    if isinstance(base, TensorDataset) and len(base.tensors) == 2:
        x, y = base.tensors
        if indices is not None:
            x, y = x[indices], y[indices]
        return x.clone(), y.clone()
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("dataset is empty and not a TensorDataset: its shapes are unknown")
    items = [dataset[i] for i in range(n)]
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        raise ValueError("dataset items must be (input, target) pairs")
    x = torch.stack([torch.as_tensor(it[0]) for it in items])
    y = torch.stack([torch.as_tensor(it[1]) for it in items])
    return x, y


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"config[{name!r}] must be an int; got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"config[{name!r}] must be >= {lo}; got {v}")
    return int(v)


def _check_real(name: str, v: Any, lo: float, strict: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise TypeError(f"config[{name!r}] must be a finite real number; got {v!r}")
    if float(v) < lo or (strict and float(v) == lo):
        raise ValueError(f"config[{name!r}] must be {'>' if strict else '>='} {lo}; got {v}")
    return float(v)


def fit_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` over :data:`DEFAULT_FIT_CONFIG`, validated (errors name the key)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping; got {type(config).__name__}")
    s = {**DEFAULT_FIT_CONFIG, **config}
    s["local_epochs"] = _check_int("local_epochs", s["local_epochs"], 1)
    s["batch_size"] = _check_int("batch_size", s["batch_size"], 1)
    s["lr"] = _check_real("lr", s["lr"], 0.0, strict=True)
    s["proximal_mu"] = _check_real("proximal_mu", s["proximal_mu"], 0.0, strict=False)
    if "seed" not in s:
        raise ValueError("config['seed'] is required: it fixes the order of local batches")
    s["seed"] = _check_int("seed", s["seed"], 0)
    if s["loss_fn"] is None:
        s["loss_fn"] = F.cross_entropy
    elif not callable(s["loss_fn"]):
        raise TypeError(f"config['loss_fn'] must be callable; got {type(s['loss_fn']).__name__}")
    return s


def _model_from(config: Mapping[str, Any]) -> nn.Module:
    model = config.get("model")
    if model is None:
        model_fn: Optional[Callable[[], nn.Module]] = config.get("model_fn")
        if model_fn is None or not callable(model_fn):
            raise ValueError("config needs 'model' (an nn.Module) or 'model_fn' (a callable building one)")
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"config['model'] must be a torch.nn.Module; got {type(model).__name__}")
    return model


class Client:
    """A device that owns ``dataset`` (any map-style Dataset of (input, target) pairs; a Subset
    of a TensorDataset is indexed without a copy per item). ``cid`` names it in results."""

    def __init__(self, dataset: Dataset, *, cid: Optional[int] = None) -> None:
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a torch Dataset; got {type(dataset).__name__}")
        if cid is not None and (isinstance(cid, bool) or not isinstance(cid, numbers.Integral) or cid < 0):
            raise ValueError(f"cid must be an int >= 0 or None; got {cid!r}")
        self.cid = None if cid is None else int(cid)
        self._x, self._y = _materialize(dataset)
        self._local_dp: Optional[LocalDPState] = None  # the client's own DP-SGD state (local DP)

    @property
    def num_examples(self) -> int:
        return int(self._x.shape[0])

    def __repr__(self) -> str:
        return f"Client(cid={self.cid}, num_examples={self.num_examples})"

    def local_epsilon(self, delta: float) -> Optional[float]:
        """ε at ``delta`` that this client's own local-DP accountant has spent: every DP-SGD step
        it took, those of a fit that raised part-way included; None before its first DP step.
        The device's own answer (the simulation asks it when a fit fails, see
        :func:`ppml_fast.federated.backends.base.failed_client_epsilon`)."""
        return None if self._local_dp is None else self._local_dp.epsilon(delta)

    # ------------------------------------------------------------------ fit

    def fit(self, parameters: torch.Tensor, config: Mapping[str, Any]) -> FitResult:
        """Train locally from ``parameters`` (the flat vector of the model's floating state)
        as the module docstring says; return the update and the number of examples."""
        s = fit_settings(config)
        model = _model_from(config)
        layout = ParameterLayout.of(model)
        layout.check(parameters, "parameters")
        layout.load(model, parameters)
        local_dp = config.get("local_dp")
        if local_dp is not None:  # DP-SGD on the client's own state (local_epsilon reads it)
            state = self._local_dp or LocalDPState(check_local_dp(local_dp).accountant)
            try:
                metrics = local_dp_sgd(model, self._x, self._y, s, local_dp, state)
            except BaseException:
                # a fit that failed part-way has composed its noisy steps (and used its noise):
                # a first state is kept too, so the client's budget check and its reported ε
                # count those steps; a refusal before training leaves a new client stateless
                if state.accountant.history or state.noise_offset:
                    self._local_dp = state
                raise
            self._local_dp = state
        else:
            loss_sum, seen = self._local_sgd(model, s)
            metrics = {"loss": loss_sum / seen} if seen else {}
        update = layout.flatten(model) - parameters.to(torch.float32)
        return FitResult(update=update, num_examples=self.num_examples, metrics=metrics)

    def _local_sgd(self, model: nn.Module, s: Mapping[str, Any]) -> tuple[float, int]:
        params = [p for p in model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if s["proximal_mu"] > 0 else None
        gen = torch.Generator().manual_seed(s["seed"])
        n, b, lr, mu = self.num_examples, s["batch_size"], s["lr"], s["proximal_mu"]
        model.train()
        loss_sum, seen = 0.0, 0
        for _ in range(s["local_epochs"]):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, b):
                idx = perm[start:start + b]
                loss = s["loss_fn"](model(self._x[idx]), self._y[idx])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for i, (p, g) in enumerate(zip(params, grads)):
                        step = torch.zeros_like(p) if g is None else g
                        if anchors is not None:
                            step = step + mu * (p - anchors[i])
                        p.sub_(step, alpha=lr)
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
        return loss_sum, seen

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, parameters: torch.Tensor, config: Mapping[str, Any]) -> EvalResult:
        """Mean loss and accuracy (for class logits) of ``parameters`` on this client's data."""
        model = _model_from(config)
        layout = ParameterLayout.of(model)
        layout.check(parameters, "parameters")
        layout.load(model, parameters)
        loss_fn = config.get("loss_fn") or F.cross_entropy
        return evaluate_model(model, self._x, self._y, loss_fn)


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   loss_fn: Callable = F.cross_entropy) -> EvalResult:
    """Mean loss and, for (N, classes) outputs with integer targets, accuracy."""
    n = int(x.shape[0])
    if n == 0:
        return EvalResult(loss=float("nan"), num_examples=0, metrics={})
    model.eval()
    loss_sum, correct, has_acc = 0.0, 0, True
    with torch.no_grad():
        for start in range(0, n, _EVAL_BATCH):
            xb, yb = x[start:start + _EVAL_BATCH], y[start:start + _EVAL_BATCH]
            out = model(xb)
            loss_sum += float(loss_fn(out, yb)) * len(yb)
            if out.dim() == 2 and not yb.is_floating_point():
                correct += int((out.argmax(1) == yb).sum())
            else:
                has_acc = False
    metrics = {"accuracy": correct / n} if has_acc else {}
    return EvalResult(loss=loss_sum / n, num_examples=n, metrics=metrics)
