"""``nn.MultiheadAttention`` under DP, without replacing the module.

``nn.MultiheadAttention`` calls its projections as raw matmuls inside
``F.multi_head_attention_forward``, so no layer hook sees them. :func:`forward` is the same
computation written with ``linear`` calls that the recorder captures like any ``nn.Linear``
(ghost norms and book-keeping, :mod:`ppml_fast.privacy.per_sample.linear`); the module, its
parameters and its state_dict stay the user's. Every call torch accepts on dense tensors is
supported, none through the torch.func fallback:

- self-attention (``query is key is value``, ``nn.TransformerEncoderLayer``): one linear call with
  the whole packed ``in_proj_weight`` / ``in_proj_bias``, as torch does;
- cross-attention with the packed weight (``nn.TransformerDecoderLayer.multihead_attn``: query =
  target stream, key = value = memory): the q projection uses rows ``[0, E)`` of the packed
  parameters, the k and v projections rows ``[E, 3E)`` in one call (``key is value``) or rows
  ``[E, 2E)`` and ``[2E, 3E)`` in two. Each call names its rows (a :class:`Part`); the engine sums
  the squared per-sample norms of the parts of one parameter and writes each part's clipped sum
  into its rows, so a parameter used on disjoint parts keeps ghost norms and book-keeping;
- ``kdim``/``vdim`` != ``embed_dim``: separate ``q_proj_weight``, ``k_proj_weight``,
  ``v_proj_weight``, each with its third of the packed ``in_proj_bias``;
- ``add_bias_kv``: ``bias_k`` (1, 1, E) is appended to every sample's keys, so sample i's gradient
  of ``bias_k`` is the gradient of its own appended key row (samples do not interact). It is
  recorded as a bias-only linear call on an empty (B, 1, 0) input, whose output is ``bias_k`` for
  each sample and whose per-sample bias gradient is exactly that row's gradient; likewise
  ``bias_v``;
- ``add_zero_attn`` (no parameters), ``key_padding_mask``, ``attn_mask`` (2-D or 3-D, bool or
  float), ``is_causal``, ``need_weights``, ``average_attn_weights``, ``batch_first`` and unbatched
  inputs, with ``F.multi_head_attention_forward``'s semantics (which mask wins under
  ``is_causal``, where ``scaled_dot_product_attention`` is used).

Internally everything is batch first, (B, L, E) and (B, heads, L, head_dim); torch works sequence
first, so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F


class Part(NamedTuple):
    """Elements ``[start, start + prod(shape))`` of ``param`` flattened, viewed as ``shape``: the
    piece of a packed parameter one projection uses (rows ``[a, b)`` of a 2-D weight are the
    elements ``[a * cols, b * cols)``)."""

    param: torch.Tensor
    start: int
    shape: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + math.prod(self.shape)

    def view(self, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The part of ``t`` (default: of ``param``), which has ``param``'s shape."""
        t = self.param if t is None else t
        return t.reshape(-1)[self.start:self.stop].view(self.shape)


Operand = Union[torch.Tensor, Part, None]
# linear(owner, x, weight, bias) -> F.linear(x, weight, bias); weight None: a bias-only call whose
# output is the bias broadcast over x.shape[:-1] (x then has 0 features).
LinearCall = Callable[[nn.Module, torch.Tensor, Operand, Operand], torch.Tensor]


def rows(param: Optional[torch.Tensor], start: int, stop: int) -> Optional[Part]:
    """Rows ``[start, stop)`` (dimension 0) of ``param`` as a :class:`Part`; None for None."""
    if param is None:
        return None
    cols = math.prod(param.shape[1:])
    return Part(param, start * cols, (stop - start,) + tuple(param.shape[1:]))


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype, name: str) -> Optional[torch.Tensor]:
    """A MultiheadAttention mask (bool: True = masked out; float: added) as a float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor; got dtype {mask.dtype}")
    return mask.to(dtype)


def _check_mask(mask: Optional[torch.Tensor], name: str, allowed: tuple[tuple[int, ...], ...]) -> None:
    if mask is not None and tuple(mask.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(str(a) for a in allowed)}; "
                         f"got {tuple(mask.shape)}")


def _project(mha: nn.MultiheadAttention, linear: LinearCall, q_in, k_in, v_in):
    """q, k, v (B, L|S, E): the in-projections, as ``F._in_projection_packed`` / ``_in_projection``."""
    e = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if not mha._qkv_same_embed_dim:  # kdim/vdim != embed_dim: one weight each, the bias packed
        ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        return tuple(linear(mha, x, wi, rows(b, i * e, (i + 1) * e))
                     for i, (x, wi) in enumerate(zip((q_in, k_in, v_in), ws)))
    if q_in is k_in and k_in is v_in:  # self-attention: one packed call
        return linear(mha, q_in, w, b).split(e, dim=-1)
    q = linear(mha, q_in, rows(w, 0, e), rows(b, 0, e))
    if k_in is v_in:  # encoder-decoder: one call for k and v on the memory
        k, v = linear(mha, k_in, rows(w, e, 3 * e), rows(b, e, 3 * e)).split(e, dim=-1)
        return q, k, v
    k = linear(mha, k_in, rows(w, e, 2 * e), rows(b, e, 2 * e))
    v = linear(mha, v_in, rows(w, 2 * e, 3 * e), rows(b, 2 * e, 3 * e))
    return q, k, v


def forward(
    mha: nn.MultiheadAttention,
    linear: LinearCall,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    need_weights: bool = True,
    attn_mask: Optional[torch.Tensor] = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
):
    """``mha(query, key, value, ...)`` with every parameter used through ``linear``; same
    arguments, returns and semantics as ``nn.MultiheadAttention.forward`` (training path)."""
    batched = query.dim() == 3
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError("query, key and value must all be 3-D (batched) or all 2-D (unbatched); got "
                         f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")

    def batch_first(t: torch.Tensor) -> torch.Tensor:
        if not batched:
            return t.unsqueeze(0)
        return t if mha.batch_first else t.transpose(0, 1)

    # identities matter: they choose the packed calls (as in torch)
    q_in = batch_first(query)
    k_in = q_in if key is query else batch_first(key)
    v_in = k_in if value is key else (q_in if value is query else batch_first(value))
    b, tgt, e = q_in.shape
    src = k_in.shape[1]
    if e != mha.embed_dim or v_in.shape[:2] != k_in.shape[:2] or k_in.shape[0] != b:
        raise ValueError(f"query must be (B, L, {mha.embed_dim}) and key, value (B, S, ·) batch first "
                         f"(or as the layout says); got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    h = mha.num_heads
    hd = e // h
    if not batched and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    _check_mask(key_padding_mask, "key_padding_mask", ((b, src),))
    _check_mask(attn_mask, "attn_mask", ((tgt, src), (b * h, tgt, src)))

    pad = _additive(key_padding_mask, q_in.dtype, "key_padding_mask")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch says). You may use "
                           "nn.Transformer.generate_square_subsequent_mask to create this mask.")
    if is_causal and pad is None and not need_weights:
        mask = None  # F.multi_head_attention_forward: the hint replaces the mask (SDPA is_causal)
    else:
        mask = _additive(attn_mask, q_in.dtype, "attn_mask")
        is_causal = is_causal and pad is None

    q, k, v = _project(mha, linear, q_in, k_in, v_in)
    if mask is not None:  # (1, 1, L, S) or (B, H, L, S)
        mask = mask.view(1, 1, tgt, src) if mask.dim() == 2 else mask.view(b, h, tgt, src)
    if pad is not None:
        pad = pad.view(b, 1, 1, src)

    if (mha.bias_k is None) != (mha.bias_v is None):
        raise ValueError(f"{mha!r}: bias_k and bias_v must both be set or both be None")
    if mha.bias_k is not None:  # appended to every sample's keys / values
        empty = q_in.new_zeros(b, 1, 0)
        k = torch.cat([k, linear(mha, empty, None, Part(mha.bias_k, 0, (e,)))], dim=1)
        v = torch.cat([v, linear(mha, empty, None, Part(mha.bias_v, 0, (e,)))], dim=1)
        mask, pad = (None if m is None else F.pad(m, (0, 1)) for m in (mask, pad))

    q = q.reshape(b, tgt, h, hd).transpose(1, 2)
    k = k.reshape(b, k.shape[1], h, hd).transpose(1, 2)  # explicit sizes: B = 0 is a valid batch
    v = v.reshape(b, v.shape[1], h, hd).transpose(1, 2)
    if mha.add_zero_attn:
        zeros = k.new_zeros(b, h, 1, hd)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        mask, pad = (None if m is None else F.pad(m, (0, 1)) for m in (mask, pad))
    if pad is not None:
        mask = pad if mask is None else mask + pad
    dropout = mha.dropout if mha.training else 0.0

    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if dropout > 0:  # the returned weights are the dropped-out ones, as torch returns them
            weights = F.dropout(weights, dropout)
        attn = weights @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
        if not batched:
            weights = weights.squeeze(0)
    else:
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              is_causal=is_causal)
    out = attn.transpose(1, 2).reshape(b, tgt, e)
    out = linear(mha.out_proj, out, mha.out_proj.weight, mha.out_proj.bias)
    if not batched:
        out = out.squeeze(0)
    elif not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights
