"""The real models of issue 16, built from tiny configs with random weights (no download):
what ``ppml-fast bench --only models`` times (:mod:`ppml_fast.benchmarks.models`), what
:mod:`ppml_fast.benchmarks.profile_step` breaks down, and what
``tests/privacy/test_real_models_reference.py`` checks against a float64 per-record reference.

Each :class:`ModelSpec` builds its model from a seed and draws a batch (inputs, target) from a
generator, at one of the :data:`SIZES`: ``"bench"`` (issue 16's table: hidden 64, 2 layers,
4 heads, feed-forward 256, vocabulary 1000, sequences of 32 tokens, batch 16; images 3x32x32;
ResNet-18 at torchvision's widths with batch 32) or ``"test"`` (smaller, for float64 references
and smoke tests). The loss of every model is the mean cross-entropy over its records (a language
model's: over all tokens, i.e. the mean over records of each record's mean over its tokens).

``build_opacus`` (only where it differs from ``build``): the model Opacus is given, with the same
weights, e.g. ``opacus.layers.DPLSTM`` in place of ``nn.LSTM`` (Opacus refuses ``nn.LSTM``).
transformers and peft are imported only when an HF model is built (``pip install
'ppml_fast[bench]'``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

SEED = 0
CLASSES = 10

SIZES: dict[str, dict[str, int]] = {
    "bench": {"hidden": 64, "layers": 2, "heads": 4, "ff": 256, "vocab": 1000, "seq": 32,
              "batch": 16, "image": 32, "patch": 4, "resnet_width": 64, "resnet_batch": 32},
    "test": {"hidden": 16, "layers": 2, "heads": 2, "ff": 32, "vocab": 50, "seq": 6,
             "batch": 4, "image": 16, "patch": 4, "resnet_width": 4, "resnet_batch": 4},
}


@dataclass(frozen=True)
class ModelSpec:
    """One model of the benchmark: ``build(size)`` -> nn.Module (float32, seeded inside, train
    mode), ``batch(size, generator)`` -> (inputs: dict of keyword tensors, target)."""

    key: str
    title: str
    build: Callable[[dict], nn.Module]
    batch: Callable[[dict, torch.Generator], tuple[dict, torch.Tensor]]
    build_opacus: Optional[Callable[[dict], nn.Module]] = None
    opacus_note: str = ""  # what the Opacus rows ran instead, e.g. "DPLSTM"


def forward_loss(model: nn.Module, inputs: dict, target: torch.Tensor) -> torch.Tensor:
    """The step's loss: mean cross-entropy of the model's logits (HF outputs' ``.logits``)."""
    out = model(**inputs)
    return loss_of(getattr(out, "logits", out), target)


def loss_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="peft")


def _bert_config(s: dict):
    import transformers

    return transformers.BertConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["ff"],
        max_position_embeddings=max(64, s["seq"]), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=CLASSES)


def _seeded(make: Callable[[dict], nn.Module]) -> Callable[[dict], nn.Module]:
    def build(s: dict) -> nn.Module:
        torch.manual_seed(SEED)
        return make(s).train()
    return build


def _bert(s: dict) -> nn.Module:
    import transformers

    _quiet()
    return transformers.BertForSequenceClassification(_bert_config(s))


def _bert_frozen_embeddings(s: dict) -> nn.Module:
    model = _bert(s)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    return model


def _roberta(s: dict) -> nn.Module:
    import transformers

    _quiet()
    cfg = transformers.RobertaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["ff"],
        max_position_embeddings=max(64, s["seq"]) + 2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=CLASSES, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(cfg)


def _gpt2(s: dict) -> nn.Module:
    import transformers

    _quiet()
    cfg = transformers.GPT2Config(
        vocab_size=s["vocab"], n_positions=max(64, s["seq"]), n_embd=s["hidden"],
        n_layer=s["layers"], n_head=s["heads"], n_inner=s["ff"], resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)  # lm_head tied to transformer.wte


def _lora(model: nn.Module, targets: list[str], save: Optional[list[str]] = None) -> nn.Module:
    import peft

    # init_lora_weights=False: B random too (with B = 0 every A gradient is zero, which would
    # make the reference check of the A matrices vacuous); r = 8 as peft's default
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False, modules_to_save=save)
    return peft.get_peft_model(model, cfg)


def _gpt2_lora(s: dict) -> nn.Module:
    return _lora(_gpt2(s), ["c_attn"])


def _bert_lora(s: dict) -> nn.Module:
    return _lora(_bert(s), ["query", "value"], save=["classifier"])


def _vit(s: dict) -> nn.Module:
    import transformers

    _quiet()
    cfg = transformers.ViTConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        intermediate_size=s["ff"], image_size=s["image"], patch_size=s["patch"], num_channels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES)
    return transformers.ViTForImageClassification(cfg)


# -- ResNet-18 with GroupNorm (torchvision's resnet18 layout, written here: no torchvision) ------
def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, c // 2)), c)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with GroupNorm in place of BatchNorm (as Opacus's fixer does)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = _gn(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _gn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18GN(nn.Module):
    """resnet18: 7x7/2 stem, 3x3/2 max pool, four stages of two BasicBlocks at widths
    w, 2w, 4w, 8w (torchvision: w = 64), global average pool, linear head."""

    def __init__(self, width: int = 64, classes: int = CLASSES) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), _gn(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(pixel_values))
        return self.fc(h.mean(dim=(2, 3)))


# -- recurrent classifiers ----------------------------------------------------------------------
class RecurrentClassifier(nn.Module):
    """Embedding -> 2-layer ``rnn`` (nn.LSTM or nn.GRU, batch first) -> linear head on the last
    position's output."""

    def __init__(self, kind: str, vocab: int, hidden: int, layers: int, rnn: Optional[nn.Module] = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = rnn if rnn is not None else cls(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embedding(input_ids))
        return self.head(out[:, -1])


def _rnn(kind: str) -> Callable[[dict], nn.Module]:
    return lambda s: RecurrentClassifier(kind, s["vocab"], s["hidden"], s["layers"])


def _dp_rnn(kind: str) -> Callable[[dict], nn.Module]:
    """The same model (same weights) with Opacus's DPLSTM / DPGRU, which Opacus needs."""

    def build(s: dict) -> nn.Module:
        from opacus.layers import DPGRU, DPLSTM

        torch.manual_seed(SEED)
        plain = RecurrentClassifier(kind, s["vocab"], s["hidden"], s["layers"])
        dp = {"lstm": DPLSTM, "gru": DPGRU}[kind](s["hidden"], s["hidden"], num_layers=s["layers"],
                                                  batch_first=True)
        dp.load_state_dict(plain.rnn.state_dict())  # DPRNNBase maps nn.LSTM's parameter names
        model = RecurrentClassifier(kind, s["vocab"], s["hidden"], s["layers"], rnn=dp)
        model.embedding.load_state_dict(plain.embedding.state_dict())
        model.head.load_state_dict(plain.head.state_dict())
        return model.train()

    return build


# -- batches ------------------------------------------------------------------------------------
def _tokens(s: dict, g: torch.Generator, b: int) -> torch.Tensor:
    return torch.randint(2, s["vocab"], (b, s["seq"]), generator=g)


def _labels(g: torch.Generator, b: int) -> torch.Tensor:
    return torch.randint(0, CLASSES, (b,), generator=g)


def _text_batch(s: dict, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    b = s["batch"]
    return {"input_ids": _tokens(s, g, b)}, _labels(g, b)


def _bert_batch(s: dict, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """BERT with explicit (B, T) position ids: one row per record (a real tensor, not a view)."""
    b = s["batch"]
    ids = _tokens(s, g, b)
    pos = torch.arange(s["seq"]).repeat(b, 1)
    return {"input_ids": ids, "position_ids": pos}, _labels(g, b)


def _lm_batch(s: dict, g: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Next-token targets: the inputs shifted by one (the last target is a fresh token); explicit
    (B, T) position ids, as for BERT (Opacus's embedding rule fails on GPT-2's default (1, T)
    ones: "stack expects each tensor to be equal size")."""
    b = s["batch"]
    ids = torch.randint(2, s["vocab"], (b, s["seq"] + 1), generator=g)
    pos = torch.arange(s["seq"]).repeat(b, 1)
    return {"input_ids": ids[:, :-1].contiguous(), "position_ids": pos}, ids[:, 1:].contiguous()


def _image_batch(key: str) -> Callable[[dict, torch.Generator], tuple[dict, torch.Tensor]]:
    def batch(s: dict, g: torch.Generator) -> tuple[dict, torch.Tensor]:
        b = s["resnet_batch"] if key == "resnet18-gn" else s["batch"]
        x = torch.randn(b, 3, s["image"], s["image"], generator=g)
        return {"pixel_values": x}, _labels(g, b)
    return batch


MODELS: dict[str, ModelSpec] = {m.key: m for m in (
    ModelSpec("bert", "BertForSequenceClassification, full (explicit (B, T) position_ids)",
              _seeded(_bert), _bert_batch),
    ModelSpec("roberta", "RobertaForSequenceClassification, full", _seeded(_roberta), _text_batch),
    ModelSpec("bert-frozen-emb", "BERT with frozen embeddings (Opacus tutorial)",
              _seeded(_bert_frozen_embeddings), _bert_batch),
    ModelSpec("gpt2", "GPT2LMHeadModel, full (tied head; explicit (B, T) position_ids)",
              _seeded(_gpt2), _lm_batch),
    ModelSpec("vit", "ViTForImageClassification, full", _seeded(_vit), _image_batch("vit")),
    ModelSpec("resnet18-gn", "ResNet-18 with GroupNorm",
              _seeded(lambda s: ResNet18GN(s["resnet_width"])), _image_batch("resnet18-gn")),
    ModelSpec("gpt2-lora", "GPT-2 + LoRA (peft, c_attn, r 8)", _seeded(_gpt2_lora), _lm_batch),
    ModelSpec("bert-lora", "BERT + LoRA (peft, query/value, r 8; classifier trained)",
              _seeded(_bert_lora), _bert_batch),
    ModelSpec("lstm", "Embedding + nn.LSTM (2 layers) classifier", _seeded(_rnn("lstm")),
              _text_batch, build_opacus=_dp_rnn("lstm"), opacus_note="DPLSTM"),
    ModelSpec("gru", "Embedding + nn.GRU (2 layers) classifier", _seeded(_rnn("gru")),
              _text_batch, build_opacus=_dp_rnn("gru"), opacus_note="DPGRU"),
)}


def select_models(keys: Optional[list[str]]) -> list[ModelSpec]:
    """The specs named by ``keys`` (all, in table order, when None); ValueError for an unknown key."""
    if not keys:
        return list(MODELS.values())
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; expected some of {list(MODELS)}")
    return [MODELS[k] for k in keys]


def make_batch(spec: ModelSpec, size: dict, seed: int = SEED) -> tuple[dict, torch.Tensor]:
    return spec.batch(size, torch.Generator().manual_seed(seed))

