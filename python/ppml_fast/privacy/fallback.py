"""Per-sample gradients of any module's own parameters by torch.func, from the inputs and the
output gradient the recorder captured: for sample i, the vector-Jacobian product of the module
applied to sample i alone with grad_out[i]. Exact for every module whose samples do not interact
(BatchNorm is refused before it gets here); it reruns the module's forward, so it is the slow
path, used only where no rule applies.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def per_sample_grads(
    module: nn.Module, params: dict[str, nn.Parameter], inputs: tuple, grad_out: torch.Tensor
) -> dict[str, torch.Tensor]:
    """name -> (B, *param.shape) for the module's own parameters ``params`` (name -> parameter)."""
    names = list(params)
    values = tuple(p.detach() for p in params.values())
    batched = tuple(0 if isinstance(a, torch.Tensor) else None for a in inputs)

    def loss(vals, args, g):
        args = tuple(a.unsqueeze(0) if isinstance(a, torch.Tensor) else a for a in args)
        out = functional_call(module, dict(zip(names, vals)), args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{type(module).__name__}: the torch.func path needs a module that returns one "
                f"tensor; got {type(out).__name__}"
            )
        return (out * g.unsqueeze(0)).sum()

    grads = vmap(grad(loss), in_dims=(None, batched, 0))(values, inputs, grad_out)
    return dict(zip(names, grads))
