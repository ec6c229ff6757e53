"""Which modules the DP step supports, and how: the functional op a module runs (its rule in
:mod:`ppml_fast.privacy.per_sample`) and that op's arguments, the modules refused with a reason,
and :func:`fix_module` (BatchNorm -> GroupNorm).

A module is handled by a rule only when its class runs the stock ``forward`` of a supported
class (a subclass that overrides ``forward`` falls back to torch.func, which is exact for any
module whose samples are independent).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ppml_fast.accounting.errors import PrivacyError


class UnsupportedModuleError(PrivacyError, ValueError):
    """A module whose per-sample gradients cannot be private as it stands."""


def _conv_kwargs(m: nn.Module) -> dict:
    return {"stride": m.stride, "padding": 0 if m.padding_mode != "zeros" else m.padding,
            "dilation": m.dilation, "groups": m.groups}


def _conv_activation(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if m.padding_mode != "zeros":  # the module pads first, then convolves with padding 0
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
    return x


# class -> (rule key, kwargs(module), activation(module, input) or None)
_RULE_MODULES: dict[type, tuple[str, Callable[[nn.Module], dict], Optional[Callable]]] = {
    nn.Linear: ("linear", lambda m: {}, None),
    nn.Conv1d: ("conv1d", _conv_kwargs, _conv_activation),
    nn.Conv2d: ("conv2d", _conv_kwargs, _conv_activation),
    nn.Conv3d: ("conv3d", _conv_kwargs, _conv_activation),
    nn.Embedding: ("embedding", lambda m: {"padding_idx": m.padding_idx,
                                           "num_embeddings": m.num_embeddings}, None),
    nn.LayerNorm: ("layer_norm", lambda m: {"normalized_shape": tuple(m.normalized_shape),
                                            "eps": m.eps}, None),
    nn.GroupNorm: ("group_norm", lambda m: {"num_groups": m.num_groups, "eps": m.eps}, None),
    nn.InstanceNorm1d: ("instance_norm", lambda m: {"eps": m.eps}, None),
    nn.InstanceNorm2d: ("instance_norm", lambda m: {"eps": m.eps}, None),
    nn.InstanceNorm3d: ("instance_norm", lambda m: {"eps": m.eps}, None),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _RULE_MODULES[nn.RMSNorm] = ("rms_norm", lambda m: {  # eps None: finfo(input dtype).eps
        "normalized_shape": tuple(m.normalized_shape), "eps": m.eps}, None)


def _weight_bias(m: nn.Module, params: dict) -> tuple:
    # not params.get("weight", m.weight): that reads m.weight (Module.__getattr__) on every call
    return (params["weight"] if "weight" in params else m.weight,
            params["bias"] if "bias" in params else m.bias)


def _embedding_forward(m: nn.Embedding, x: torch.Tensor, p: dict) -> torch.Tensor:
    """F.embedding as the module runs it, refusing (before the lookup) the options make_private
    refuses when one was set afterwards: ``max_norm`` would renormalise the looked-up rows of the
    weight in place (the weight would change on a refused step and tell which tokens the batch
    held), ``sparse`` / ``scale_grad_by_freq`` change the gradient the rule computes."""
    if m.max_norm is not None or m.sparse or m.scale_grad_by_freq:
        raise UnsupportedModuleError(
            f"{type(m).__name__}: max_norm={m.max_norm!r}, sparse={m.sparse!r}, "
            f"scale_grad_by_freq={m.scale_grad_by_freq!r} were set after make_private; the DP "
            "step supports max_norm=None, sparse=False, scale_grad_by_freq=False (nothing was "
            "looked up or changed)")
    return F.embedding(x, p.get("weight", m.weight), m.padding_idx, None, m.norm_type, False, False)


# class -> its forward as a functional of (module, input, parameters): ``params`` maps roles to the
# (detached) tensors to use instead of the module's own; a role not in it is read from the module.
# The DP step calls these with detached trainable parameters, so that autograd does not compute
# their summed gradients (book-keeping computes the clipped sums instead) without switching
# ``requires_grad`` off and on around every call. Each entry is the stock forward of its class.
_FUNCTIONAL_FORWARDS: dict[type, Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]] = {
    nn.Linear: lambda m, x, p: F.linear(x, *_weight_bias(m, p)),
    nn.Conv1d: lambda m, x, p: m._conv_forward(x, *_weight_bias(m, p)),
    nn.Conv2d: lambda m, x, p: m._conv_forward(x, *_weight_bias(m, p)),
    nn.Conv3d: lambda m, x, p: m._conv_forward(x, *_weight_bias(m, p)),
    nn.Embedding: lambda m, x, p: _embedding_forward(m, x, p),
    nn.LayerNorm: lambda m, x, p: F.layer_norm(x, m.normalized_shape, *_weight_bias(m, p), m.eps),
    nn.GroupNorm: lambda m, x, p: F.group_norm(x, m.num_groups, *_weight_bias(m, p), m.eps),
}
if hasattr(nn, "RMSNorm") and hasattr(F, "rms_norm"):
    _FUNCTIONAL_FORWARDS[nn.RMSNorm] = lambda m, x, p: F.rms_norm(
        x, m.normalized_shape, p.get("weight", m.weight), m.eps)


def _hf_conv1d_forward(m: nn.Module, x: torch.Tensor, p: dict) -> torch.Tensor:
    """transformers' ``Conv1D.forward`` (``x @ W + b``, W of shape (nx, nf)), op for op."""
    weight, bias = _weight_bias(m, p)
    size_out = x.size()[:-1] + (m.nf,)
    return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size_out)


# Classes of optional libraries, matched by (module, qualified name) so that ppml_fast never
# imports them -> (rule spec as in _RULE_MODULES, functional forward). A class is used only after
# its forward gave bit for bit the functional's output once (_lazy_checked): a library version
# whose forward computes something else goes to torch.func instead.
_LAZY_MODULES: dict[tuple[str, str], tuple[tuple, Callable]] = {
    ("transformers.pytorch_utils", "Conv1D"): (("linear_t", lambda m: {}, None), _hf_conv1d_forward),
}
_lazy_checked: dict[tuple, bool] = {}


def _lazy_agrees(base: type, module: nn.Module, functional: Callable) -> bool:
    """Whether ``base.forward`` and ``functional`` agree on ``module`` (checked once per class
    and forward function, on a small random input; False when it cannot run, e.g. on the meta
    device). Keyed by the forward too: a class whose forward was patched after the check (a
    library's monkeypatch) is checked again instead of trusted (review A16)."""
    key = (base, base.forward)
    if key not in _lazy_checked:
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.device.type == "meta":
            return False  # not cached: another module of the class may be usable
        try:
            x = torch.randn(2, 3, w.shape[0], generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64).to(device=w.device, dtype=w.dtype)
            with torch.no_grad():
                ok = torch.equal(base.forward(module, x), functional(module, x, {}))
        except Exception:  # noqa: BLE001 - anything unexpected: not handled by the rule
            ok = False
        _lazy_checked[key] = bool(ok)
    return _lazy_checked[key]


def _match(module: nn.Module):
    """(rule spec or None, functional or None) of the first class in ``module``'s MRO that is in
    the tables, or (None, None); a class that overrides that class's forward matches nothing."""
    cls = type(module)
    for base in cls.__mro__:
        if base in _RULE_MODULES or base in _FUNCTIONAL_FORWARDS:
            # the stock forward of a convolution calls _conv_forward: a subclass overriding it
            # (weight scaling, ...) computes something else (review S7)
            if cls.forward is not base.forward or (
                    hasattr(base, "_conv_forward") and cls._conv_forward is not base._conv_forward):
                return None, None
            return _RULE_MODULES.get(base), _FUNCTIONAL_FORWARDS.get(base)
        lazy = _LAZY_MODULES.get((base.__module__, base.__qualname__))
        if lazy is not None:
            # parameters other than weight / bias (an adapter a patched forward reads) would get
            # no gradient from the functional: torch.func runs the module's own forward instead
            own = {n for n, p in module._parameters.items() if p is not None}
            if (cls.forward is not base.forward or not own <= {"weight", "bias"}
                    or not _lazy_agrees(base, module, lazy[1])):
                return None, None
            return lazy
    return None, None


def functional_forward(module: nn.Module):
    """``f(module, input, params) -> output``, the module's stock forward as a functional, for a
    module of a class in the table whose ``forward`` is not overridden (else None)."""
    return _match(module)[1]


def rule_for(module: nn.Module):
    """(rule key, kwargs, activation transform or None) for a module a rule handles, else None
    (transformers' ``Conv1D`` included, matched without importing transformers)."""
    return _match(module)[0]


def refusal(name: str, module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be trained privately as it is, or None."""
    label = f"{name or 'the model'} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (f"{label}: BatchNorm mixes the samples of a batch, so per-sample gradients do not "
                "exist; replace it with ppml_fast.privacy.fix_module(model) (GroupNorm)")
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return (f"{label}: track_running_stats=True keeps un-noised statistics of the data; "
                "use track_running_stats=False")
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return f"{label}: sparse=True gradients are not supported; use sparse=False"
        if module.scale_grad_by_freq:
            return f"{label}: scale_grad_by_freq=True couples the samples of a batch"
        if module.max_norm is not None:
            return f"{label}: max_norm renormalises the weights in place from the data; use max_norm=None"
    if parametrize.is_parametrized(module):
        return (f"{label}: parametrized parameters (torch.nn.utils.parametrize, e.g. "
                "weight_norm / spectral_norm / orthogonal) are not supported: the trainable "
                "tensor is not the one the layer computes with; remove the parametrization")
    if isinstance(module, nn.RNNBase):  # nn.LSTM / GRU / RNN: ppml_fast.privacy.recurrent
        from ppml_fast.privacy.recurrent import refusal as recurrent_refusal

        why = recurrent_refusal(module)
        if why:
            return f"{label}: {why}"
    return None


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    c = bn.num_features
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and g <= c)
    return nn.GroupNorm(min(groups, c), c, eps=bn.eps, affine=bn.affine)


def fix_module(model: nn.Module) -> nn.Module:
    """Replaces every BatchNorm layer of ``model`` by a GroupNorm over the same channels (32
    groups or the largest divisor of the channel count below it, as Opacus's ModuleValidator
    does), in place; returns ``model``. A BatchNorm that is the model itself is returned replaced.
    """
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _group_norm_for(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, _group_norm_for(child))
        else:
            fix_module(child)
    return model
