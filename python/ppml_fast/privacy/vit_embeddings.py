"""Per-sample gradients of transformers' ``ViTEmbeddings`` parameters in closed form, instead of
the torch.func path (:mod:`ppml_fast.privacy.fallback`).

Why (issue 16): ``ViTEmbeddings`` owns raw parameters (``cls_token`` (1, 1, H),
``position_embeddings`` (1, N + 1, H), ``mask_token`` (1, 1, H) when built with one) and no rule
covers them, so the torch.func path reran the whole module (its patch convolution included) record
by record under ``vmap``: 2.3 ms of a 19 ms DP step of the tiny ViT of the models bench, more than
all its linear layers' norms together.

The stock forward computes, for record i with patch embeddings ``X_i`` (N, H) (from a child
module; its own gradients are that child's business) and an optional 0/1 mask ``m_i`` (N,)::

    E_i = cat(cls, X_i * (1 - m_i) + mask_token * m_i) + pos,      out_i = dropout(E_i)

so, with ``g_i = d loss / d out_i`` and dropout the identity (evaluation mode or p = 0), record i's
gradients are linear in ``g_i`` alone (the loss is a sum over records):
``d/d pos = g_i``, ``d/d cls = g_i[0]``, ``d/d mask_token = sum_t m_{i,t} g_i[1 + t]``.

Used only when all of these hold (else torch.func runs, as before):

- the module's class is (a subclass not overriding the forward of) transformers'
  ``ViTEmbeddings``, matched by module and name (transformers is never imported here), and the
  instance's forward is not replaced;
- that class's forward agreed with these formulas once (per class and forward function): on a
  random input, random parameters and a random output gradient, autograd's summed gradients of the
  stock forward equal the sums of the formulas (a random gradient per row checks every row's
  Jacobian, so a library version that computes anything else is not trusted);
- the call did not ask for ``interpolate_pos_encoding`` (the position table is then resampled);
- its dropout is the identity; its output has one row per record, and its first row equals
  ``cls + pos[0]`` bit for bit (what the formula's forward gives there).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_CLASS = ("transformers.models.vit.modeling_vit", "ViTEmbeddings")
_agrees: dict[tuple, bool] = {}  # (class, forward) -> whether the formulas hold


def _stock_class(module: nn.Module) -> Optional[type]:
    """transformers' ViTEmbeddings in ``module``'s MRO when no class overrides its forward and
    the instance's forward is not replaced, else None."""
    if "forward" in module.__dict__:
        return None
    cls = type(module)
    for base in cls.__mro__:
        if (base.__module__, base.__qualname__) == _CLASS:
            return base if cls.forward is base.forward else None
    return None


def _dropout_identity(module: nn.Module) -> bool:
    d = getattr(module, "dropout", None)
    return type(d) is nn.Dropout and (not d.training or d.p == 0.0)


def _formula(g: torch.Tensor, mask: Optional[torch.Tensor], names) -> dict[str, torch.Tensor]:
    """name -> (B, *param.shape) per-sample gradients from the output gradient g (B, N + 1, H)."""
    out = {}
    if "position_embeddings" in names:
        out["position_embeddings"] = g.unsqueeze(1)
    if "cls_token" in names:
        out["cls_token"] = g[:, :1].unsqueeze(1)
    if "mask_token" in names:
        if mask is None:
            out["mask_token"] = g.new_zeros((g.shape[0], 1, 1, g.shape[-1]))
        else:
            m = mask.to(g.dtype).unsqueeze(-1)  # (B, N, 1)
            out["mask_token"] = (g[:, 1:] * m).sum(1)[:, None, None, :]
    return out


def _check_class(base: type, module: nn.Module) -> bool:
    """Whether ``base.forward`` agrees with :func:`_formula` (once per class and forward)."""
    key = (base, base.forward)
    if key in _agrees:
        return _agrees[key]
    ok = False
    try:
        import copy

        probe = copy.deepcopy(module).to(torch.float64).eval()
        gen = torch.Generator().manual_seed(0)
        names = [n for n, p in probe._parameters.items() if p is not None]
        with torch.no_grad():
            for n in names:
                getattr(probe, n).copy_(torch.randn(getattr(probe, n).shape, generator=gen, dtype=torch.float64))
        size = probe.image_size if isinstance(probe.image_size, (tuple, list)) else (probe.image_size,) * 2
        chans = probe.patch_embeddings.num_channels
        x = torch.randn(3, chans, *size, generator=gen, dtype=torch.float64)
        for masked in (False, True):
            if masked and probe.mask_token is None:
                continue
            mask = None
            if masked:
                mask = torch.rand(3, probe.patch_embeddings.num_patches, generator=gen) < 0.5
            params = [getattr(probe, n) for n in names]
            out = probe(x, bool_masked_pos=mask) if masked else probe(x)
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            want = torch.autograd.grad(out, params, g, allow_unused=True)
            got = _formula(g, mask, names)
            for n, w in zip(names, want):
                if n in got:
                    s = got[n].sum(0)
                    if w is None:
                        w = torch.zeros_like(s)
                    if not torch.allclose(w, s, rtol=1e-12, atol=1e-12):
                        raise ValueError(n)
        ok = True
    except Exception:  # noqa: BLE001 - anything unexpected: not trusted, torch.func runs
        ok = False
    _agrees[key] = ok
    return ok


def per_sample(module: nn.Module, params: dict[str, nn.Parameter], rerun, grads_out) -> Optional[dict]:
    """The per-sample gradients of ``params`` (name -> (B, *shape)) of a recorded ViTEmbeddings
    call, or None when the closed form does not apply (module docstring)."""
    base = _stock_class(module)
    if base is None or rerun is None or not _dropout_identity(module):
        return None
    if not set(params) <= {"cls_token", "position_embeddings", "mask_token"}:
        return None
    args, kwargs = rerun.args, rerun.kwargs
    names = ("pixel_values", "bool_masked_pos", "interpolate_pos_encoding")
    bound = dict(zip(names, args))
    if len(args) > len(names) or set(kwargs) - set(names) or set(bound) & set(kwargs):
        return None
    bound.update(kwargs)
    flag = bound.get("interpolate_pos_encoding")
    if flag is not None and flag is not False:  # the forward's `if` on it: resampled table
        return None
    mask = bound.get("bool_masked_pos")
    if len(rerun.outputs) != 1 or len(grads_out) != 1:
        return None
    out, b = rerun.outputs[0], rerun.batch_size
    cls, pos = module.cls_token, module.position_embeddings
    if (out.dim() != 3 or out.shape[0] != b or tuple(out.shape[1:]) != tuple(pos.shape[1:])
            or (mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (b, out.shape[1] - 1)))):
        return None
    with torch.no_grad():
        first = (cls[0, 0] + pos[0, 0]).to(out.dtype)
        if not torch.equal(out[:, 0], first.expand(b, -1)):
            return None
    if not _check_class(base, module):
        return None
    g = grads_out[0]
    if g is None:
        g = torch.zeros_like(out)
    return {n: t.to(params[n].dtype) for n, t in _formula(g, mask, params).items()}
