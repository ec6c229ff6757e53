"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` under DP, without replacing the module: while a batch is
captured, the module's forward runs layer by layer as an autograd function (the native op forward,
backpropagation through time written out) whose backward hands out each layer and direction's
gate gradients. The module, its parameters and state_dict stay the user's.

Calls recorded per layer l and direction k (``_reverse`` suffix), :data:`FAST` (the default):

- one ``"recurrent"`` call (:mod:`ppml_fast.privacy.recurrent_rule`, layer
  :mod:`ppml_fast.privacy.recurrent_layer`) for ``weight_ih_l{l}``, ``weight_hh_l{l}``,
  ``bias_ih_l{l}``, ``bias_hh_l{l}``: activation ``[x | h_{t-1}]`` (the layer's input after dropout,
  and the states the steps start from, ``h_0`` first), output gradient the gates' pre-activation
  gradients, both views of the layer's time-major buffers;
- ``weight_hr_l{l}`` (LSTM ``proj_size``): a linear call, activation ``o * tanh(c)``, output
  gradient ``dL/dh``.

With ``FAST = False`` (the path before issue 16's item; kept for A/B runs and as a cross-check in
tests/privacy/test_recurrent_fused.py), each weight matrix is its own ``F.linear``-shaped call
for the linear rule (:mod:`ppml_fast.privacy.per_sample.recurrent`): ``weight_ih`` with activation
``x`` and output gradient ``delta``, ``weight_hh`` with ``h_{t-1}`` and ``delta'`` (for the GRU
its n block times ``r``), ``weight_hr`` as above.

All options: ``num_layers``, ``bidirectional``, ``batch_first`` both ways (the module's own flag
says where its batch is; make_private's ``batch_first`` says where the model's inputs hold their
records), ``bias``, ``dropout`` between layers (F.dropout on the layer's output, per element:
per record), ``proj_size``, ``nonlinearity``, given or omitted ``hx`` (its batch dimension is 1,
as in torch), unbatched 2-D inputs (a batch of one). Refused: ``PackedSequence`` inputs (while a
batch is captured; at the call, naming the layer), subclasses that override ``forward``, and
layers whose parameters are not exactly their weights (``torch.nn.utils.weight_norm``, pruning:
a weight rebuilt from other parameters by a pre-hook; at make_private, or at the call when added
later).
Packed batches would need per-record masks in the backward (each record's own last step and, for
the reverse direction, its own reversal: tried, exact) but their padded length is the longest
record's, so the captured tensors' shape depends on other records, which the records probe
rightly refuses (it perturbs lengths too); pass padded tensors instead.

Records (privacy invariant 1): the calls' rows are the module's batch dimension; a batch-first
tensor fed to a ``batch_first=False`` module makes the time steps the module's batch: refused by
the size check when T != B and by the records probe (:mod:`ppml_fast.privacy.records`: the
recurrence then mixes records into every row) when T == B.

Speed: see :mod:`ppml_fast.privacy.recurrent_layer` (issue 16's measurements, and why the 1.5x
target is out of reach of a Python loop over the steps).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from ppml_fast.privacy.capture import Call, stamp
from ppml_fast.privacy.layers import UnsupportedModuleError
from ppml_fast.privacy.per_sample import Captured
from ppml_fast.privacy import recurrent_layer as _fused
from ppml_fast.privacy.per_sample.recurrent import Direction, Grads, Layer, batch_first
from ppml_fast.privacy.recurrent_rule import OP, RecurrentRule

_CLASSES = (nn.LSTM, nn.GRU, nn.RNN)

# Module switch (A/B and tests): True records one "recurrent" call per layer and direction
# (recurrent_rule, recurrent_layer); False one linear call per weight matrix (the path before).
FAST = True


def handles(mod: nn.Module) -> bool:
    """Whether ``mod`` is an nn.LSTM / nn.GRU / nn.RNN (or a subclass) running the stock forward."""
    return any(isinstance(mod, c) and type(mod).forward is c.forward for c in _CLASSES)


def _foreign_weights(mod: nn.Module) -> Optional[str]:
    """Why ``mod``'s parameters are not exactly its own weights, or None. The recorded calls
    read each weight by name (``weight_ih_l0``, ...) and give the linear rule that tensor; a
    weight rebuilt from other parameters before each forward (``torch.nn.utils.weight_norm``'s
    pre-hook: ``weight_ih_l0_g`` / ``_v`` trainable, ``weight_ih_l0`` a plain tensor) would be
    clipped and summed as a tensor the optimizer never sees, while ``_g`` / ``_v`` got no
    gradient at all (review A16)."""
    names = set(getattr(mod, "_flat_weights_names", ()))
    params = {n for n, p in mod._parameters.items() if p is not None}
    if params == names:
        # a subclass property (or attribute) shadowing a weight's name: the calls read it
        shadowed = sorted(n for n in names if getattr(mod, n, None) is not mod._parameters[n])
        if not shadowed:
            return None
        return (f"its weights {shadowed[:4]} read by name are not its parameters of that name (a "
                "property or attribute of the class shadows them): ppml_fast's recurrent layers "
                "compute with the parameters themselves")
    return (f"its parameters {sorted(params ^ names)[:4]} are not the layer's own weights "
            f"({sorted(names)[:2]}, ...) (torch.nn.utils.weight_norm or another hook rebuilding a "
            "weight from other parameters?): ppml_fast's recurrent layers compute with the "
            "layer's weights themselves; remove the hook")


def refusal(mod: nn.Module) -> Optional[str]:
    """Why a recurrent module cannot be trained privately, or None."""
    if not isinstance(mod, nn.RNNBase):
        return None
    if not handles(mod):
        return ("a recurrent layer whose class is not nn.LSTM / nn.GRU / nn.RNN with the stock "
                "forward (a subclass overriding forward, or nn.RNNBase itself) is not supported: "
                "ppml_fast computes recurrent per-sample gradients from the stock forward")
    return _foreign_weights(mod)


def _param(m: nn.Module, role: str, layer: int, k: int):
    return getattr(m, f"{role}_l{layer}{'_reverse' if k else ''}", None)


def install(private, mod: nn.Module) -> None:
    """Replaces ``mod.forward`` (an nn.LSTM / GRU / RNN, :func:`handles`) by the recorded
    computation while ``private`` (a PrivateModule) captures a batch; the class's forward
    otherwise (not captured, a deep copy, ``torch.func.functional_call``, every parameter
    frozen). ``remove_hooks()`` restores it."""
    rec = private.recorder
    cls = next(c for c in _CLASSES if isinstance(mod, c))

    def dp_forward(m, input, hx=None):
        batch = rec._current()
        trainable = {n: p for n, p in m._parameters.items() if p is not None and p.requires_grad}
        if (batch is None or m is not mod or not trainable
                or any(not isinstance(p, nn.Parameter) for p in m._parameters.values() if p is not None)):
            return cls.forward(m, input, hx)
        why = _foreign_weights(m)  # a hook added after make_private (review A16)
        if why:
            batch.refusal = batch.refusal or f"{private._name(m)}: {why}"
            return cls.forward(m, input, hx)
        if isinstance(input, PackedSequence):
            raise UnsupportedModuleError(
                f"{private._name(m)}: PackedSequence inputs are not supported by ppml_fast's "
                "recurrent layers; pass the padded tensor (and mask the padded steps out of the "
                "loss, e.g. read each record's output at its last real step)")
        if FAST and OP not in private.rules:  # the fused calls' rule, in the rules' mode
            private.rules[OP] = RecurrentRule(getattr(private.rules.get("linear"), "mode", "auto"))
        return _run(private, m, batch, input, hx)

    private._set_forward(mod, dp_forward)


def _run(private, m: nn.Module, batch, input: torch.Tensor, hx):
    lstm = isinstance(m, nn.LSTM)
    if input.dim() not in (2, 3):
        raise ValueError(f"{type(m).__name__}: expected input to be 2-D or 3-D; got {input.dim()}-D")
    bf = m.batch_first
    unbatched = input.dim() == 2
    if unbatched:  # one sequence: a batch of one, as torch does
        input = input.unsqueeze(1 if not bf else 0)
        if hx is not None:
            hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
    if hx is None:  # torch's own shape checks
        m.check_input(input, None)
    else:
        m.check_forward_args(input, hx, None)
    if input.shape[1 if bf else 0] == 0:  # as torch's own RNN ops refuse it (review S8)
        raise RuntimeError(f"{type(m).__name__}: expected sequence length to be larger than 0 in "
                           f"RNN; got input of shape {tuple(input.shape)} (batch_first={bf})")
    rows = input.shape[0 if bf else 1]
    hout = m.proj_size if lstm and m.proj_size > 0 else m.hidden_size
    dirs_n = 2 if m.bidirectional else 1
    if hx is None:
        h0 = input.new_zeros(m.num_layers * dirs_n, rows, hout)
        c0 = input.new_zeros(m.num_layers * dirs_n, rows, m.hidden_size) if lstm else None
    else:
        h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    if rows != batch.size:
        batch.refusal = batch.refusal or (
            f"{private._name(m)}: its batch dimension ({'0' if bf else '1'}, "
            f"batch_first={bf}) has {rows} rows in a forward of {batch.size} "
            "records: per-sample clipping needs one row per record (batch-first data into a "
            "batch_first=False module, or the reverse?)")
    x = input
    hns, cns = [], []
    for layer in range(m.num_layers):
        dirs = []
        for k in range(dirs_n):
            dirs.append(Direction(*(None if (p := _param(m, r, layer, k)) is None else p.detach()
                                    for r in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))))
        sl = slice(layer * dirs_n, (layer + 1) * dirs_n)
        args = (private, m, batch, x, layer, dirs, h0[sl], None if c0 is None else c0[sl])
        out, hn, cn = _layer_fused(*args) if FAST else _layer_linear(*args)
        hns.append(hn)
        if lstm:
            cns.append(cn)
        x = out
        if m.dropout > 0 and m.training and layer < m.num_layers - 1:
            x = F.dropout(out, m.dropout, training=True)  # per element: per record
    h_n = torch.cat(hns, 0)
    c_n = torch.cat(cns, 0) if lstm else None
    if unbatched:
        x = x.squeeze(1 if not bf else 0)
        h_n = h_n.squeeze(1)
        c_n = c_n.squeeze(1) if lstm else None
    return (x, (h_n, c_n)) if lstm else (x, h_n)


def _record(private, m, batch, cap: Captured) -> Call:
    call = Call(m, dict(cap.params), cap=cap)
    stamp(call)
    private.recorder.check_inside(call, batch)
    batch.calls.append(call)
    return call


def _trainable(m, layer: int, k: int, roles) -> dict:
    return {r: p for r in roles if (p := _param(m, r, layer, k)) is not None and p.requires_grad}


def _layer_fused(private, m, batch, x, layer, dirs, h0, c0):
    """One layer through :class:`recurrent_layer.Layer` (``x`` in the module's layout): per
    direction a "recurrent" call (and a linear one for ``weight_hr``)."""
    recorded: list[dict] = [{} for _ in dirs]

    def sink(k: int, g: _fused.Grads) -> None:
        for part, grad in ((OP, g.g), ("hr", g.dh)):
            call = recorded[k].get(part)
            if call is not None and grad is not None:
                grad = grad.transpose(0, 1) if part == OP else batch_first(grad)  # a view / a copy
                call.grad = grad if call.grad is None else call.grad + grad

    saved: list = []
    out, hn, cn = _fused.Layer.apply(x, h0, c0, m.mode, dirs, sink, saved, private.recorder._anchor,
                                     m.batch_first)
    for k, s in enumerate(saved):
        gates = _trainable(m, layer, k, ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        if gates:
            blocks = _fused.blocks(m.mode, s.d, s.act.shape[-1] - s.d, m.hidden_size, m.bias)
            recorded[k][OP] = _record(private, m, batch, Captured(
                OP, s.act.transpose(0, 1), gates, {"blocks": blocks}))
        proj = _trainable(m, layer, k, ("weight_hr",))
        if proj:
            recorded[k]["hr"] = _record(private, m, batch, Captured(
                "linear", batch_first(s.m), {"weight": proj["weight_hr"]}, {}))
    return out, hn, cn


def _layer_linear(private, m, batch, x, layer, dirs, h0, c0):
    """One layer through :class:`per_sample.recurrent.Layer` (time-major inside): one linear
    call per weight matrix (``FAST = False``)."""
    bf = m.batch_first
    xt = x.transpose(0, 1).contiguous() if bf else x  # time-major (T, B, d)
    first = x.detach() if layer == 0 and bf and x.is_contiguous() else None
    recorded: list[dict] = [{} for _ in dirs]

    def sink(k: int, g: Grads) -> None:
        for part, grad in (("ih", g.delta_x), ("hh", g.delta_h), ("hr", g.dh)):
            call = recorded[k].get(part)
            if call is not None and grad is not None:
                call.grad = grad if call.grad is None else call.grad + grad

    saved: list = []
    out, hn, cn = Layer.apply(xt, h0, c0, m.mode, dirs, sink, saved, private.recorder._anchor)
    for k, s in enumerate(saved):
        acts = {"ih": s.x, "hh": s.h_prev, "hr": s.m}
        for part in ("ih", "hh", "hr"):
            params = _trainable(m, layer, k, (f"weight_{part}", f"bias_{part}"))
            if not params:
                continue
            act = first if part == "ih" and k == 0 and first is not None else batch_first(acts[part].detach())
            recorded[k][part] = _record(private, m, batch, Captured(
                "linear", act, {r.split("_")[0]: p for r, p in params.items()}, {}))
    return (out.transpose(0, 1) if bf else out), hn, cn
