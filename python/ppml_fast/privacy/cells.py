"""nn.LSTMCell, nn.GRUCell and nn.RNNCell written in plain tensor operations, for the torch.func
path (:mod:`ppml_fast.privacy.fallback`): ``torch.func.vmap`` has no batching rule for
``aten::lstm_cell`` (and only a slow per-sample fallback for the GRU/RNN cells), so the cells'
own forwards cannot be rerun record by record. The formulas are those of the PyTorch
documentation of each class (gate order i, f, g, o for the LSTM; r, z, n for the GRU); the
fallback checks that the rerun reproduces the outputs the module's real forward produced.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def _affine(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.linear(x, w, b)


def _gates(p: dict, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_ih x + b_ih, W_hh h + b_hh)."""
    gx = _affine(x, p["weight_ih"], p.get("bias_ih"))
    return gx, _affine(h, p["weight_hh"], p.get("bias_hh"))


def _batched(m: nn.Module, x: torch.Tensor, hx):
    """(input as (N, in), hx as a tuple of (N, hidden) or None, whether to squeeze back)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
        hx = None if hx is None else tuple(h.unsqueeze(0) for h in _states(hx))
        return x, hx, True
    return x, (None if hx is None else _states(hx)), False


def _states(hx) -> tuple:
    return tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)


def _zeros(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[0], m.hidden_size)


def lstm_cell(m: nn.LSTMCell, p: dict, input: torch.Tensor, hx=None):
    x, hx, squeeze = _batched(m, input, hx)
    h, c = hx if hx is not None else (_zeros(m, x), _zeros(m, x))
    gx, gh = _gates(p, x, h)
    gates = gx + gh
    i, f, g, o = gates.chunk(4, dim=1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h2 = torch.sigmoid(o) * torch.tanh(c2)
    return (h2.squeeze(0), c2.squeeze(0)) if squeeze else (h2, c2)


def gru_cell(m: nn.GRUCell, p: dict, input: torch.Tensor, hx=None):
    x, hx, squeeze = _batched(m, input, hx)
    h = hx[0] if hx is not None else _zeros(m, x)
    gx, gh = _gates(p, x, h)
    (xr, xz, xn), (hr, hz, hn) = gx.chunk(3, dim=1), gh.chunk(3, dim=1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h2 = (1 - z) * n + z * h
    return h2.squeeze(0) if squeeze else h2


def rnn_cell(m: nn.RNNCell, p: dict, input: torch.Tensor, hx=None):
    x, hx, squeeze = _batched(m, input, hx)
    h = hx[0] if hx is not None else _zeros(m, x)
    gx, gh = _gates(p, x, h)
    pre = gx + gh
    h2 = torch.tanh(pre) if m.nonlinearity == "tanh" else torch.relu(pre)
    return h2.squeeze(0) if squeeze else h2


_CELLS: dict[type, Callable] = {nn.LSTMCell: lstm_cell, nn.GRUCell: gru_cell, nn.RNNCell: rnn_cell}


def cell_forward(module: nn.Module) -> Optional[Callable]:
    """``f(module, params, input, hx=None)`` for a module running a stock cell forward (params:
    role -> tensor, every parameter of the cell), else None."""
    for cls, f in _CELLS.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return f
    return None
