"""Per-record losses for :class:`~ppml_fast.integrations.huggingface.DPTrainer`: one loss per
record of the batch, each depending on that record alone, so that their sum is what DP-SGD
differentiates (``loss_reduction="sum"``: each record's gradient is the gradient of its own loss).

Why not the model's own loss: a Hugging Face model returns the mean over the *tokens* of the
whole batch (``CrossEntropyLoss(ignore_index=-100)`` on the flattened labels). Record i's share
of that loss is ``sum_t l_it / T_batch``, where ``T_batch`` counts every record's labelled
tokens; scaling it by the batch size does not give a per-record loss, and removing record j
changes the weight of every other record's gradient (through ``T_batch``), so the clipped sum
would not have sensitivity C. Here each record's loss is normalised by its own token count
(``sum_t l_it / T_i``; 0 for a record without labelled tokens), which no other record changes.

Supported heads (the labels decide): class labels (B,) with logits (B, C) (sequence
classification; cross-entropy), token labels (B, T) with logits (B, T, V) (token
classification, masked LM; -100 ignored; for causal LMs shifted by one as Hugging Face does),
float labels of the logits' shape (multi-label: BCE with logits, mean over labels) and
regression (one logit, or ``problem_type="regression"``: squared error, mean per record), as
Hugging Face's heads decide between them.
Anything else raises TypeError naming the shapes; override
``DPTrainer.compute_per_record_loss`` for other heads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # Hugging Face's label for positions without a loss
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _per_record_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each record's valid positions (all dimensions but the first); 0 for none."""
    dims = tuple(range(1, values.dim()))
    if not dims:
        return values
    count = valid.sum(dims).to(values.dtype)
    return values.sum(dims) / count.clamp(min=1)


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor, *, causal_lm: bool = False,
                    problem_type: Optional[str] = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Loss of each record, shape (B,), from a model's ``logits`` and the batch's ``labels``.

    ``causal_lm``: position t predicts label t + 1 (Hugging Face's shift for causal LMs).
    ``problem_type``: the model config's (``"regression"``, ``"single_label_classification"``,
    ``"multi_label_classification"``); None decides as Hugging Face's sequence classifiers do:
    one logit is regression, integer labels single-label, float labels multi-label.
    ``label_smoothing``: as ``TrainingArguments.label_smoothing_factor`` (cross-entropy only).
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"logits and labels must be tensors; got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.dim() == 0 or labels.dim() == 0 or logits.shape[0] != labels.shape[0]:
        raise TypeError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must share "
                        "their first (record) dimension")
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}; got {problem_type!r}")
    if causal_lm:
        if labels.dim() != 2 or logits.dim() != 3:
            raise TypeError(f"a causal LM needs labels (B, T) and logits (B, T, V); got labels "
                            f"{tuple(labels.shape)} and logits {tuple(logits.shape)}")
        logits, labels = logits[:, :-1], labels[:, 1:]
    everywhere = torch.ones((), dtype=torch.bool, device=logits.device)
    if problem_type == "regression" or (problem_type is None and logits.dim() == 2
                                        and logits.shape[-1] == 1):
        pred = logits.squeeze(-1) if labels.dim() == 1 and logits.dim() == 2 else logits
        if pred.shape != labels.shape:
            raise TypeError(f"regression needs labels of the logits' shape; got logits "
                            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}")
        sq = (pred - labels.to(pred.dtype)) ** 2
        return _per_record_mean(sq, everywhere.expand(sq.shape))
    if problem_type == "multi_label_classification" or (
            problem_type is None and labels.is_floating_point() and logits.shape == labels.shape):
        if logits.shape != labels.shape:
            raise TypeError(f"multi-label classification needs labels of the logits' shape; got "
                            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
        bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return _per_record_mean(bce, everywhere.expand(bce.shape))
    if not labels.is_floating_point() and logits.dim() == labels.dim() + 1 \
            and logits.shape[:-1] == labels.shape:
        # class or token labels: cross-entropy per position, -100 ignored (Hugging Face's rule)
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               reduction="none", ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
        return _per_record_mean(flat.view(labels.shape), labels != IGNORE_INDEX)
    raise TypeError(
        f"no per-record loss for logits {tuple(logits.shape)} ({logits.dtype}) and labels "
        f"{tuple(labels.shape)} ({labels.dtype}); override DPTrainer.compute_per_record_loss to "
        "return one loss per record, each computed from that record alone")
