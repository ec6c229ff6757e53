"""Many clients of one architecture trained together: stacked parameters ``(K, ...)`` and
``torch.func.functional_call`` + ``vmap`` over clients, one SGD step of all K clients at once.

What it reproduces: ``Client.fit``'s local SGD (see :mod:`ppml_fast.federated.client`) —
each client's batch order is drawn exactly as there (``torch.Generator().manual_seed(seed)``,
one ``randperm`` per epoch, consecutive batches of ``batch_size``), each step is
``p -= lr * (grad(mean loss) + mu * (p - p_received))`` (FedProx's proximal term, as
``Client.fit`` applies it). Batches are padded (to ``batch_size``, or less when no client of
the chunk has that many examples) with a per-sample mask; the loss of a client is the masked
mean; a client whose data ran out takes masked no-op steps (zero gradient, no proximal step).
The state kept is each client's update ``delta = p - p_received`` (written in place into the
(K, P) result matrix: no extra pass at the end), which rounds differently from the sequential
``p_trained - p_received`` by about one float32 ulp of the parameters: the results agree
with the sequential backend within float rounding.

This is client-side simulation code: it reads the clients' private ``_x`` / ``_y`` tensors once,
in :meth:`VectorizedBackend.setup` (a snapshot: later changes to a client's data are not seen),
as the simulated devices would. Nothing on the server or strategy side does.

What it does not vectorise, by decision:
- a client whose class overrides ``fit`` or ``_local_sgd`` (its own training, e.g. a faulty
  client in a test) is run with its own ``fit``, one by one, like the sequential backend, and
  abandoned at the deadline as there (:mod:`ppml_fast.federated.deadline`); the chunks
  trained together are not interrupted: each client is charged its chunk's wall time divided
  by the chunk's clients, and the simulation drops it when that exceeds the deadline;
- ValueError, before any training: models whose floating buffers change in training
  (BatchNorm / InstanceNorm with running statistics; a BatchNorm without them is trained with
  its statistics over each client's real rows, not the padded ones: :mod:`.masked_norm`, and a
  client whose batches would hold a single row trains with its own ``fit``), models with dropout (``p > 0``: its masks
  cannot match the sequential draws), tied weights, a ``loss_fn`` other than cross-entropy
  (the default) and ``local_dp`` (local DP-SGD needs the sequential or Ray backend);
- clients whose inputs or targets differ in shape or dtype are trained in separate groups.
Clients of a group are cut into chunks of at most ``chunk_size``; when there is more than one
chunk, they are first sorted (stably) by their number of examples (similar clients share a
chunk: fewer padded steps and slots). The chunks write their updates into the consecutive rows
of one (K, P) CPU matrix (on the CPU, training updates those rows in place); when that order is
the callers' (one chunk, or clients of equal size), the strategy reads the matrix as it is
(:func:`~ppml_fast.federated.strategy.base.stack_updates` makes no copy). Working memory: a few
times ``chunk_size`` x parameters floats plus one batch per client of the chunk; the round's
results take one float32 row of parameters per client, as with every backend.
"""

from __future__ import annotations

import numbers
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..client import DEFAULT_FIT_CONFIG, Client, fit_settings
from ..parameters import ParameterLayout
from ..types import FitResult
from ..deadline import DeadlineRunner
from .base import Backend, Outcome, make_model
from .masked_norm import MaskSlot, mask_batch_norms

__all__ = ["VectorizedBackend"]


def _check_model(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            raise ValueError(
                f"backend 'vectorized' cannot train {type(m).__name__} ({name!r}): its running "
                "statistics change in training; use backend='sequential' or track_running_stats=False "
                "(batch statistics, taken over each client's real rows)")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(
                f"backend 'vectorized' cannot reproduce the random masks of {type(m).__name__} "
                f"({name!r}); use backend='sequential'")
    seen: dict[int, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point():
            if id(t) in seen:
                raise ValueError(f"backend 'vectorized' does not train tied weights ({seen[id(t)]!r} "
                                 f"is {name!r}); use backend='sequential'")
            seen[id(t)] = name


def _overrides_training(client: Client) -> bool:
    cls = type(client)
    return cls.fit is not Client.fit or cls._local_sgd is not Client._local_sgd


_DEFAULTS = tuple(DEFAULT_FIT_CONFIG.items())


def _settings(config: Mapping[str, Any], cache: dict) -> dict[str, Any]:
    """``fit_settings(config)``, validated once per distinct non-seed configuration."""
    try:
        key = tuple([config.get(k, v) for k, v in _DEFAULTS])
        hash(key)
    except TypeError:  # unhashable values: validate this one in full
        return fit_settings(config)
    seed = config.get("seed")
    if key not in cache or type(seed) is not int or seed < 0:
        s = fit_settings(config)
        cache[key] = s
        return s
    return {**cache[key], "seed": seed}


class _Group:
    """The concatenated data of the clients whose inputs and targets share shape and dtype,
    plus one zero row at the end that padded batch slots point at."""

    def __init__(self, xs: list[torch.Tensor], ys: list[torch.Tensor], device: torch.device) -> None:
        counts = [int(x.shape[0]) for x in xs]
        self.offsets = [0] * len(xs)
        total = 0
        for i, n in enumerate(counts):
            self.offsets[i] = total
            total += n
        self.pad_row = total
        self.x = torch.cat(xs + [torch.zeros((1, *xs[0].shape[1:]), dtype=xs[0].dtype)]).to(device)
        self.y = torch.cat(ys + [torch.zeros((1, *ys[0].shape[1:]), dtype=ys[0].dtype)]).to(device)


class VectorizedBackend(Backend):
    """Clients with one architecture trained together with ``vmap`` (see the module docstring).

    Args:
        chunk_size: at most this many clients per ``vmap`` call (bounds memory).
        device: where the stacked training runs (default CPU); parameters and updates travel
            on the CPU as with every backend.
    """

    name = "vectorized"

    def __init__(self, *, chunk_size: int = 1024, device: Optional[str | torch.device] = None) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")
        self.chunk_size = int(chunk_size)
        self.device = torch.device("cpu" if device is None else device)

    # ------------------------------------------------------------------ setup

    def setup(self, clients: Sequence[Client], model_fn: Callable[[], nn.Module]) -> None:
        super().setup(clients, model_fn)
        template = make_model(model_fn)
        _check_model(template)
        self._layout = ParameterLayout.of(template)
        self._template = template.to(self.device).train()
        self._slot = MaskSlot()  # BatchNorm statistics over the real rows only (masked_norm)
        self._masked_bn = mask_batch_norms(self._template, self._slot)
        state = template.state_dict()
        self._dtypes = {n: state[n].dtype for n in self._layout.names}
        self._train = [n for n, t in zip(self._layout.names, self._layout.trainable) if t]
        self._const = [n for n, t in zip(self._layout.names, self._layout.trainable) if not t]
        self._runner = DeadlineRunner(model_fn)  # for clients with their own training
        self._step = vmap(grad_and_value(self._masked_loss, has_aux=True), in_dims=(0, None, 0, 0, 0))

        self._where: list[Optional[tuple[int, int, int]]] = []  # (group, offset, n) per client
        keys: dict[tuple, int] = {}
        members: list[list[Client]] = []
        slots: list[Optional[tuple[int, int]]] = []
        for c in self.clients:
            if _overrides_training(c):
                slots.append(None)
                continue
            key = (tuple(c._x.shape[1:]), c._x.dtype, tuple(c._y.shape[1:]), c._y.dtype)
            g = keys.setdefault(key, len(keys))
            if g == len(members):
                members.append([])
            slots.append((g, len(members[g])))
            members[g].append(c)
        self._groups = [_Group([c._x for c in m], [c._y for c in m], self.device) for m in members]
        for slot, c in zip(slots, self.clients):
            if slot is None:
                self._where.append(None)
            else:
                g, j = slot
                self._where.append((g, self._groups[g].offsets[j], c.num_examples))

    def _masked_loss(self, train: dict, const: dict, x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._slot.mask = mask
        try:
            out = functional_call(self._template, {**train, **const}, (x,))
        finally:
            self._slot.mask = None
        per_sample = F.cross_entropy(out, y, reduction="none")
        total = torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
        return total / mask.sum().clamp(min=1), total

    # ------------------------------------------------------------------ fit

    def fit(self, indices: Sequence[int], parameters: torch.Tensor,
            configs: Sequence[Mapping[str, Any]]) -> list[Outcome]:
        self._layout.check(parameters, "parameters")
        outcomes: list[Optional[Outcome]] = [None] * len(indices)
        batches: dict[tuple[int, int, int], list[tuple[int, int, dict]]] = {}
        cache: dict = {}
        for pos, (i, config) in enumerate(zip(indices, configs)):
            where = self._where[i]
            if where is None:  # the client trains its own way (abandoned at the deadline)
                outcomes[pos] = self._runner.fit(self.clients[i], parameters, config, self.deadline)
                continue
            if config.get("local_dp") is not None:
                raise ValueError("local_dp: local DP-SGD needs backend='sequential' or 'ray'; "
                                 "the vectorized backend trains without per-sample clipping")
            try:
                s = _settings(config, cache)
            except Exception as e:  # invalid config: that client fails as Client.fit would
                outcomes[pos] = Outcome(None, e, 0.0)
                continue
            if self._masked_bn and (s["batch_size"] == 1 or where[2] % s["batch_size"] == 1):
                # a one-row batch: BatchNorm raises on one value per channel in training;
                # the client's own fit raises (or not) as the sequential backend's does
                outcomes[pos] = self._runner.fit(self.clients[i], parameters, config, self.deadline)
                continue
            if s["loss_fn"] is not F.cross_entropy:
                raise ValueError("loss_fn: backend 'vectorized' trains with cross-entropy only; "
                                 f"got {s['loss_fn']!r}; use backend='sequential'")
            batches.setdefault((where[0], s["batch_size"], s["local_epochs"]), []).append((pos, i, s))
        for (g, b, epochs), items in batches.items():
            if len(items) > self.chunk_size:  # several chunks: similar sizes share one (a stable
                items.sort(key=lambda item: self._where[item[1]][2])  # sort: equal sizes keep order)
            # the updates of all chunks: consecutive rows of one CPU matrix, in the callers' order
            # unless the sort changed it, so that stack_updates hands it over without a copy
            out = torch.empty((len(items), self._layout.numel), dtype=torch.float32)
            for start in range(0, len(items), self.chunk_size):
                chunk = items[start:start + self.chunk_size]
                t0 = time.perf_counter()
                results, finite = self._train_chunk(self._groups[g], chunk, b, epochs, parameters,
                                                    out[start:start + len(chunk)])
                seconds = (time.perf_counter() - t0) / len(chunk)
                for (pos, _, _), r, ok in zip(chunk, results, finite):
                    outcomes[pos] = Outcome(r, None, seconds, ok)
        return outcomes  # type: ignore[return-value]

    def _schedule(self, group: _Group, chunk: list, b: int, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, T, W) row indices into the group's data and the matching sample mask; the batch
        order of each client is Client.fit's (same generator seeding and randperm per epoch).
        W = min(batch_size, the chunk's largest client): no batch of the chunk holds more."""
        k = len(chunk)
        counts = torch.tensor([self._where[i][2] for _, i, _ in chunk], dtype=torch.long)
        offsets = torch.tensor([self._where[i][1] for _, i, _ in chunk], dtype=torch.long)
        per_epoch = (counts + b - 1) // b * b  # an epoch's slots: whole batches
        t = int(per_epoch.max()) * epochs // b
        gen, perms, one = torch.Generator(), [], torch.zeros(1, dtype=torch.long)
        for (_, _, s), n in zip(chunk, counts.tolist()):
            if n == 1:  # randperm(1) is [0] whatever the generator (which no one else shares)
                perms.extend([one] * epochs)
            elif n:
                gen.manual_seed(s["seed"])  # the state of Client.fit's fresh Generator
                perms.extend(torch.randperm(n, generator=gen) for _ in range(epochs))
        rows = torch.full((k * t * b,), group.pad_row, dtype=torch.long)
        if perms:
            # slot of client j, epoch e, element r: j * T * b + e * per_epoch[j] + r
            seg_n = counts.repeat_interleave(epochs)
            seg_start = ((torch.arange(k) * (t * b)).repeat_interleave(epochs)
                         + torch.arange(epochs).repeat(k) * per_epoch.repeat_interleave(epochs))
            total = int(seg_n.sum())
            within = torch.arange(total) - (torch.cumsum(seg_n, 0) - seg_n).repeat_interleave(seg_n)
            slots = seg_start.repeat_interleave(seg_n) + within
            rows[slots] = torch.cat(perms) + offsets.repeat_interleave(counts * epochs)
        rows = rows.view(k, t, b)[:, :, :min(b, max(1, int(counts.max())))]
        return rows.to(self.device), (rows != group.pad_row).to(self.device)

    def _train_chunk(self, group: _Group, chunk: list, b: int, epochs: int, parameters: torch.Tensor,
                     out: torch.Tensor) -> tuple[list[FitResult], list[bool]]:
        """Train one chunk; its results (their updates: the rows of ``out``, a (k, P) float32 CPU
        matrix) and, per client, whether its update is all finite."""
        k = len(chunk)
        rows, mask = self._schedule(group, chunk, b, epochs)
        base = self._layout.unflatten(parameters.to(self.device, torch.float32))
        anchor = {n: base[n].to(self._dtypes[n]) for n in self._train}
        const = {n: base[n].to(self._dtypes[n]) for n in self._const}
        # the state is each client's update delta = p - p_received, kept in the (K, P) output
        # matrix itself; a step's parameters are p_received + delta (the first step's: the
        # received ones, stride-0 views, no copy); buffers are not trained: their update is 0
        dtype = next(iter(anchor.values())).dtype if anchor else torch.float32
        # on the CPU the training state is ``out`` itself; elsewhere a device matrix, copied at the end
        updates = out if out.device == self.device else torch.empty(out.shape, dtype=torch.float32,
                                                                   device=self.device)
        state = updates if dtype == torch.float32 else torch.zeros(updates.shape, dtype=dtype, device=self.device)
        delta, start = {}, 0
        for n, shape in zip(self._layout.names, self._layout.shapes):
            size = shape.numel()
            if n in anchor:
                delta[n] = state[:, start:start + size].view(k, *shape)
            else:
                updates[:, start:start + size] = 0.0
            start += size
        lr = torch.tensor([s["lr"] for _, _, s in chunk], dtype=dtype, device=self.device)
        mu = torch.tensor([s["proximal_mu"] for _, _, s in chunk], dtype=dtype, device=self.device)
        prox = bool((mu > 0).any())
        loss_sum = torch.zeros(k, dtype=torch.float64, device=self.device)
        for t in range(rows.shape[1]):
            idx, m = rows[:, t], mask[:, t]
            if t == 0:
                params = {n: a.unsqueeze(0).expand(k, *a.shape) for n, a in anchor.items()}
            else:
                params = {n: anchor[n] + delta[n] for n in anchor}
            grads, (_, total) = self._step(params, const, group.x[idx], group.y[idx], m)
            loss_sum += total.detach()
            step_mu = mu * m.any(1).to(dtype) if prox and t > 0 else None  # none on no-op steps
            for n in self._train:
                g, view = grads[n], (k,) + (1,) * (grads[n].dim() - 1)
                if t == 0:  # delta = 0 - lr * g
                    torch.mul(g, -lr.view(view), out=delta[n])
                    continue
                if step_mu is not None:  # FedProx: + mu * (p - p_received) = mu * delta
                    g = g + step_mu.view(view) * delta[n]
                delta[n].addcmul_(lr.view(view), g, value=-1)
        if state is not updates:  # a model in another float type: its deltas, as float32
            updates.copy_(state)
        # a finite row sum means a finite row (NaN, Inf propagate); overflowing sums are re-checked
        finite = torch.isfinite(updates.sum(dim=1))
        if not bool(finite.all()):
            finite = torch.isfinite(updates).all(dim=1)
        finite = finite.tolist()
        if updates is not out:
            out.copy_(updates)
        results = []
        for (_, i, _), row, loss in zip(chunk, out.unbind(0), loss_sum.tolist()):
            n = self._where[i][2]
            results.append(FitResult(update=row, num_examples=n, metrics={"loss": loss / (epochs * n)} if n else {}))
        return results, finite
