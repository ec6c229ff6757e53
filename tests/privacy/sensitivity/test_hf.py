"""Hugging Face GPT-2 (tied LM head) and BERT (classifier; masked LM with tied head) built from tiny configs (no download), with their
default position_ids ((1, T), broadcast over the batch; issue 14 item 8), fully trained and with
peft LoRA (on the attention projections, and on an nn.Embedding: issue 14 item 7). Adversarial
records: one token repeated over the whole sequence, and a record that attends to one position."""

from __future__ import annotations

import warnings

import peft  # in the test extra (pyproject.toml): imported, never skipped
import pytest
import torch
import transformers
from torch import nn

from tests.privacy.sensitivity._harness import Case, check_case

B, T, V, K = 4, 8, 64, 3


def _quiet():
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def gpt2(lora_targets=None):
    def build():
        _quiet()
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        assert model.lm_head.weight is model.transformer.wte.weight  # tied head
        if lora_targets:
            model = _lora(model, lora_targets)
        return model.double()
    return build


def bert(lora_targets=None):
    def build():
        _quiet()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, num_labels=K)
        model = transformers.BertForSequenceClassification(cfg)
        if lora_targets:
            model = _lora(model, lora_targets)
        return model.double()
    return build


def bert_mlm():
    def build():
        _quiet()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, tie_word_embeddings=True)
        model = transformers.BertForMaskedLM(cfg)
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
        return model.double()
    return build


def mlm_loss(model, inputs, labels):
    logits = model(**inputs).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _lora(model, targets):
    # init_lora_weights=False: B random too (B = 0 would make every A gradient zero)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def lm_loss(model, inputs, labels):
    logits = model(**inputs).logits
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def cls_loss(model, inputs, target):
    return nn.functional.cross_entropy(model(**inputs).logits, target)


def _tokens():
    ids = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(3))
    ids[1] = 7  # one token repeated over the record
    return ids


def _gpt2_case(**kw):
    ids = _tokens()
    return dict(inputs={"input_ids": ids}, target=ids.clone(), forward_loss=lm_loss, adversarial=(1,), **kw)


def _bert_case(**kw):
    ids = _tokens()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 1:] = 0  # record 2 attends to its first position only
    return dict(inputs={"input_ids": ids, "attention_mask": mask},
                target=torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(4)),
                forward_loss=cls_loss, adversarial=(1, 2), **kw)


CASES = {
    "gpt2_tied_head": _gpt2_case(build=gpt2()),
    "gpt2_lora_c_attn": _gpt2_case(build=gpt2(["c_attn"])),
    "gpt2_lora_embedding": _gpt2_case(build=gpt2(["wte"])),
    "bert": _bert_case(build=bert()),
    "bert_mlm_tied_head": dict(_bert_case(build=bert_mlm()), target=_tokens().flip(1).contiguous(),
                               forward_loss=mlm_loss),
    "bert_lora_query_value": _bert_case(build=bert(["query", "value"])),
}


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hf(name, mode):
    check_case(Case(name=f"{name}[{mode}]", mode=mode, **CASES[name]), replace=False)


@pytest.mark.parametrize("clipping", ["per_layer", "automatic"])
@pytest.mark.parametrize("name", ["gpt2_tied_head", "bert_lora_query_value"])
def test_hf_clipping_modes(name, clipping):
    check_case(Case(name=f"{name}[{clipping}]", clipping=clipping, **CASES[name]), replace=True)
