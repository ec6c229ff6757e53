"""Neighbouring batches for the issue-16 rules: transformers' ``Conv1D`` (op ``linear_t``), tied
input/output embeddings on both tied paths (fold: the head's per-sample gradients kept; ghost:
the cross term, forced with ``rules="ghost"``), broadcast position ids, and ViT's patch embedding
(non-overlapping patches through the linear rule). Each: the clipped sum equals the float64
per-record reference and removing (or replacing) a record moves it by at most the bound;
adversarial records as in the rest of the suite (a token repeated over the record, a cancellation
pair of inputs ``(M r + a, -M r + a)`` in front of a ``Conv1D``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from tests.privacy.sensitivity._harness import CANCEL_KAPPA, Case, check_case, with_cancellation

B, T, V, D, K = 5, 6, 40, 8, 3


def _quiet():
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Conv1DNet(nn.Module):
    """Conv1D over a sequence, a non-linearity, a mean over positions, a Conv1D head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = Conv1D(16, D), Conv1D(K, 16)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)).mean(1))


class TiedSeqLM(nn.Module):
    """A language model whose head (per position) is tied to its embedding, with learned
    position embeddings looked up with (1, T) ids."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.ln = nn.Embedding(V, D), nn.Embedding(T, D), nn.LayerNorm(D)
        self.mix = Conv1D(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])[None]
        return self.head(torch.tanh(self.mix(self.ln(self.emb(ids) + self.pos(pos)))))


def _seeded(cls):
    def build():
        torch.manual_seed(0)
        return cls().double()
    return build


def _gpt2(vocab, embd=16):
    def build():
        _quiet()
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=embd, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight
        return model.double()
    return build


def _vit():
    _quiet()
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=2, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=K,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg).double()


def _lm_loss(model, inputs, labels):
    logits = model(**inputs).logits if isinstance(inputs, dict) else model(*inputs)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _vit_loss(model, inputs, target):
    return nn.functional.cross_entropy(model(**inputs).logits, target)


def _tokens(vocab):
    ids = torch.randint(1, vocab, (B, T), generator=_gen(3))
    ids[1] = 7  # one token repeated over the record
    return ids


def _cases():
    seq = torch.randn(B, T, D, generator=_gen(1), dtype=torch.float64)
    ids = _tokens(V)
    big = _tokens(200)
    pixels = torch.randn(B, 2, 8, 8, generator=_gen(5), dtype=torch.float64)
    pixels[2] *= 1e3  # one record far outside the clipping norm
    return {
        "conv1d_hf": dict(build=_seeded(Conv1DNet), inputs=(with_cancellation(seq, 2),),
                          target=torch.randint(0, K, (B,), generator=_gen(2)), adversarial=(2,),
                          kappa=CANCEL_KAPPA),
        "tied_seq_lm": dict(build=_seeded(TiedSeqLM), inputs=(ids,), target=ids.clone(),
                            forward_loss=_lm_loss, adversarial=(1,)),
        # vocabulary 200, width 32 at T = 6: the head's ghost path by the cost model too
        # (T (d + p) < 0.35 d p, linear.choose_path)
        "gpt2_tied_head_ghost": dict(build=_gpt2(200, 32), inputs={"input_ids": big}, target=big.clone(),
                                     forward_loss=_lm_loss, adversarial=(1,)),
        "gpt2_tied_head_fold": dict(build=_gpt2(V), inputs={"input_ids": ids}, target=ids.clone(),
                                    forward_loss=_lm_loss, adversarial=(1,)),
        "vit_patches": dict(build=_vit, inputs={"pixel_values": pixels},
                            target=torch.randint(0, K, (B,), generator=_gen(6)), forward_loss=_vit_loss,
                            adversarial=(2,)),
    }


CASES = _cases()


@pytest.mark.parametrize("mode, rules", [("ghost", None), ("materialize", None), ("ghost", "ghost")],
                         ids=["auto", "materialize", "ghost_rules"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_issue16_rules(name, mode, rules):
    check_case(Case(name=f"{name}[{mode},{rules}]", mode=mode, rules=rules, **CASES[name]), replace=True)


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
@pytest.mark.parametrize("name", ["gpt2_tied_head_ghost", "tied_seq_lm", "conv1d_hf"])
def test_issue16_rules_clipping_modes(name, clipping):
    check_case(Case(name=f"{name}[{clipping}]", clipping=clipping, **CASES[name]), replace=True)


def test_rules_are_used_not_torch_func_or_materialised(monkeypatch):
    """GPT-2 with a tied head: no call goes to torch.func or to the materialise-every-use path
    for shared parameters (ClippedSums._per_sample), and the tied pair is formed."""
    from ppml_fast.privacy import PrivateModule, clipping
    from ppml_fast.privacy.per_sample import tied

    model = _gpt2(200, 32)()
    private = PrivateModule(model)
    monkeypatch.setattr(clipping.ClippedSums, "_per_sample",
                        lambda self, c: pytest.fail(f"{type(c.module).__name__} materialised"))
    formed = []
    pairs = tied.pairs
    monkeypatch.setattr(tied, "pairs", lambda *a: formed.append(pairs(*a)) or formed[-1])
    big = _tokens(200)
    _lm_loss(private, {"input_ids": big}, big).backward()
    private.clipped_sums(max_grad_norm=1.0)
    assert formed and len(formed[0]) == 1
