"""One model's floating-point state as one flat vector, and back.

What travels between server and clients is a 1-D tensor holding, in ``state_dict`` order,
every floating-point parameter and buffer of the model (so e.g. GroupNorm affine weights and
any running statistics travel too; integer buffers such as ``num_batches_tracked`` stay as the
model built them). One vector per client stacks into the (K, P) matrix that
:func:`ppml_fast.ops.weighted_aggregate` averages in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ParameterLayout"]


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of a model's floating state in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    trainable: tuple[bool, ...]  # True for parameters with requires_grad, False for buffers

    @classmethod
    def of(cls, model: nn.Module) -> "ParameterLayout":
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        params = dict(model.named_parameters())
        names, shapes, trainable = [], [], []
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                names.append(name)
                shapes.append(t.shape)
                trainable.append(name in params and params[name].requires_grad)
        if not names:
            raise ValueError("model has no floating-point parameters or buffers to train")
        return cls(tuple(names), tuple(shapes), tuple(trainable))

    @property
    def numel(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The model's floating state as one float32 vector (a copy)."""
        state = model.state_dict()
        self._check_names(state)
        return torch.cat([state[n].detach().reshape(-1).to(torch.float32) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view of flat}`` with each entry's shape (views share memory with ``flat``)."""
        self.check(flat, "flat")
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = flat[start:start + n].view(shape)
            start += n
        return out

    def load(self, model: nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the model's floating state, in place (dtype of each entry kept)."""
        self.check(flat, "flat")
        state = model.state_dict()
        self._check_names(state)
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                state[name].copy_(value)

    def check(self, flat: object, name: str) -> None:
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(flat).__name__}")
        if flat.dim() != 1 or flat.numel() != self.numel or not flat.is_floating_point():
            raise ValueError(
                f"{name} must be a 1-D floating tensor of {self.numel} entries (this model's "
                f"layout); got shape {tuple(flat.shape)} and dtype {flat.dtype}")

    def _check_names(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"model does not match this layout: missing {missing[:3]}")
