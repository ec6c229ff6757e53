"""Self-attention for plain ``nn.MultiheadAttention`` under DP, without replacing the module.

``nn.MultiheadAttention`` calls its projections as raw matmuls inside
``F.multi_head_attention_forward``, so no layer hook sees them. :func:`forward` is the same
computation (packed in-projection, scaled dot-product attention, out-projection) written with
two ``F.linear`` calls that the recorder captures like any ``nn.Linear``; the module, its
parameters and its state_dict stay the user's. Self-attention only (``query is key is value``,
as in ``nn.TransformerEncoderLayer``); other calls raise a clear error.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

LinearCall = Callable[[nn.Module, dict, torch.Tensor], torch.Tensor]


def _additive(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """MultiheadAttention's masks (bool: True = masked out; float: added) as a float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
    return mask.to(dtype)


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
    if not (query is key and key is value) or not mha._qkv_same_embed_dim:
        raise NotImplementedError(
            "ppml_fast supports nn.MultiheadAttention as self-attention (query is key is value, "
            f"kdim = vdim = embed_dim); got a cross-attention call on {mha!r}"
        )
    batched = query.dim() == 3
    x = query if not batched else (query if mha.batch_first else query.transpose(0, 1))
    if not batched:
        x = x.unsqueeze(0)
    b, t, e = x.shape
    h = mha.num_heads
    hd = e // h
    qkv = linear(mha, {"weight": mha.in_proj_weight, "bias": mha.in_proj_bias}, x)
    q, k, v = (z.reshape(b, t, h, hd).transpose(1, 2) for z in qkv.split(e, dim=-1))

    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(b, h, t, t) if mask.dim() == 3 else mask.view(1, 1, t, t)
    pad = _additive(key_padding_mask, q.dtype)
    if pad is not None:
        pad = pad.view(b, 1, 1, t)
        mask = pad if mask is None else mask + pad
    causal = is_causal and mask is None
    dropout = mha.dropout if mha.training else 0.0

    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        if causal:
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        attn = F.dropout(weights, dropout, training=mha.training) @ v
        weights = weights.mean(dim=1) if average_attn_weights else weights
        if not batched:
            weights = weights.squeeze(0)
    else:
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out = attn.transpose(1, 2).reshape(b, t, e)
    out = linear(mha.out_proj, {"weight": mha.out_proj.weight, "bias": mha.out_proj.bias}, out)
    if not batched:
        out = out.squeeze(0)
    elif not mha.batch_first:
        out = out.transpose(0, 1)
    return out, weights
