"""The per-record reference of :func:`ppml_fast.audit.check_sensitivity`: each record's gradient
computed on its own (a batch of one, without the engine), clipped in float64 by DP-SGD's rule,
and summed — what the engine's clipped sum on the batch must equal.

A gap says that the engine's per-sample gradients are not the records' own gradients (issue 14,
item 7: a layer silently getting zero, a parameter used outside its module, a keyword argument
dropped) — or that the model or loss mixes records (a loss normalised by the batch's token count,
a layer that reads other records): either way the model does not train as written. A gap is not
by itself a leak (the clipped record is still within C); ``max_ratio`` measures that.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

MAX_ELEMENTS = 2 * 10**7  # records x parameters kept in float64 for the reference (160 MB)


def clipped_sum(grads: list[dict[str, torch.Tensor]], names: list[str], *, max_grad_norm,
                clipping: str, gamma: float) -> dict[str, torch.Tensor]:
    """sum_i clip(g_i) in float64, with the engine's factors (privacy/clipping.py): flat
    ``min(1, C / (||g_i|| + 1e-6))`` (Abadi et al. 2016, Algorithm 1), automatic
    ``C / (||g_i|| + gamma)`` (Bu et al. 2023), per_layer the flat rule per parameter with its
    own C_k (McMahan et al. 2018, section 3: per-layer clipping)."""
    out = {n: torch.zeros_like(grads[0][n]) for n in names}
    if clipping == "per_layer":
        norms = ([float(c) for c in max_grad_norm] if not isinstance(max_grad_norm, numbers.Real)
                 else [float(max_grad_norm)] * len(names))
        for g in grads:
            for n, c in zip(names, norms):
                out[n] += g[n] * min(1.0, c / (float(g[n].norm()) + 1e-6))
        return out
    c = float(max_grad_norm)
    for g in grads:
        norm = math.sqrt(sum(float(g[n].pow(2).sum()) for n in names))
        f = c / (norm + gamma) if clipping == "automatic" else min(1.0, c / (norm + 1e-6))
        for n in names:
            out[n] += g[n] * f
    return out


def gap(engine_sum: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], c: float) -> float:
    """``||engine − reference|| / c`` over all parameters."""
    return math.sqrt(sum(float((engine_sum[n] - reference[n]).pow(2).sum()) for n in reference)) / c


def keep_grads(n_records: int, n_params: int) -> bool:
    return n_records * n_params <= MAX_ELEMENTS


def per_record_grad(params: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """The current ``.grad`` of each named parameter in float64 (zeros where None)."""
    return {n: (torch.zeros_like(p, dtype=torch.float64) if p.grad is None
                else p.grad.detach().to(torch.float64, copy=True)) for n, p in params.items()}
