"""Options of the supported layers an attacker (or a user) can pick: grouped, dilated and
circular-padded convolutions, Embedding with max_norm (renormalises its weight in forward) and
EmbeddingBag, MultiheadAttention with key padding / attention masks, bias_k/bias_v and
add_zero_attn, a TransformerDecoderLayer (self and cross attention), norm layers without affine
parameters around trainable ones, and per-layer clipping with a different norm per parameter.
Same assertions as everywhere (``_harness``); ``refuse_ok`` where a refusal is acceptable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.privacy.sensitivity._harness import CANCEL_KAPPA, Case, check_case, scaled, with_cancellation

B, T, D, K = 6, 3, 16, 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls().double()
    return build


class ConvOptions(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular")
        self.c2 = nn.Conv1d(4, 6, 2, dilation=2, padding=1, padding_mode="reflect", bias=False)
        self.gn = nn.GroupNorm(3, 6, affine=False)
        self.head = nn.Linear(6, K)

    def forward(self, x):
        h = torch.tanh(self.c1(x)).flatten(2)  # (B, 4, 16)
        return self.head(self.gn(self.c2(h)).pow(2).mean(-1))


class EmbeddingMaxNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, D, max_norm=1.0), nn.Linear(D, K)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(20, D, mode="sum"), nn.Linear(D, K)

    def forward(self, tokens):
        return self.head(self.bag(tokens))


class MaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True)
        self.head = nn.Linear(D, K)

    def forward(self, x, pad):
        causal = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf"), dtype=x.dtype), 1)
        out = self.mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
        return self.head(out.mean(1))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=True,
                                              norm_first=True)
        self.head = nn.Linear(D, K)

    def forward(self, x, mem):
        return self.head(self.dec(x, mem).mean(1))


class NoAffineAround(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln0 = nn.LayerNorm(D, elementwise_affine=False)
        self.fc = nn.Linear(D, D, bias=False)
        self.rms = nn.RMSNorm(D, elementwise_affine=False)
        self.ln = nn.LayerNorm(D, bias=False)
        self.head = nn.Linear(D, K)

    def forward(self, x):
        return self.head(self.ln(self.rms(self.fc(self.ln0(x)))).mean(1))


def _seq(b=B, t=T, seed=1):
    return torch.randn(b, t, D, generator=_gen(seed), dtype=torch.float64)


def _cases():
    img = scaled(torch.randn(B, 4, 4, 4, generator=_gen(2), dtype=torch.float64), 1, 1e4)
    tokens = torch.randint(0, 20, (B, 5), generator=_gen(3))
    tokens[1] = 4
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[2, 1:] = True  # record 2 sees only its first position
    x = with_cancellation(scaled(_seq(), 1, 1e3), 3)
    return {
        "conv_groups_dilation_circular_reflect": dict(build=_seeded(ConvOptions), inputs=(img,), adversarial=(1,)),
        "embedding_max_norm": dict(build=_seeded(EmbeddingMaxNorm), inputs=(tokens,), adversarial=(1,),
                                   refuse_ok=True),
        "embedding_bag": dict(build=_seeded(Bag), inputs=(tokens,), adversarial=(1,), refuse_ok=True),
        "mha_masks_bias_kv_zero_attn": dict(build=_seeded(MaskedAttention), inputs=(scaled(_seq(), 1, 30.0), pad),
                                            adversarial=(1, 2)),
        "decoder_layer": dict(build=_seeded(Decoder), inputs=(scaled(_seq(), 1, 30.0), _seq(t=4, seed=5)),
                              adversarial=(1,)),
        "norms_without_affine": dict(build=_seeded(NoAffineAround), inputs=(x,), adversarial=(1, 3),
                                     kappa=CANCEL_KAPPA),
    }


CASES = _cases()


@pytest.mark.parametrize("clipping", ["flat", "per_layer", "automatic"])
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_option(name, mode, clipping):
    case = Case(name=f"{name}[{mode},{clipping}]", mode=mode, clipping=clipping,
                target=torch.randint(0, K, (B,), generator=_gen(9)), **CASES[name])
    check_case(case, replace=(clipping == "flat"))


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_per_layer_norms_differ_per_parameter(mode):
    """per_layer with one norm per trainable parameter (0.05 ... 3): each parameter's share of a
    record is clipped to its own C_p, and one record moves parameter p's sum by at most C_p."""
    model = NoAffineAround()
    n = sum(1 for p in model.parameters() if p.requires_grad)
    norms = [0.05 * 4 ** (k % 4) for k in range(n)]
    case = Case(name=f"per_layer_list[{mode}]", mode=mode, clipping="per_layer", C=norms,
                target=torch.randint(0, K, (B,), generator=_gen(9)), **CASES["norms_without_affine"])
    check_case(case, replace=True)
