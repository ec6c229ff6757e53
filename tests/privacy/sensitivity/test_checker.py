"""The user-facing checker (``ppml_fast.audit.check_sensitivity``) on configurations of this suite,
with its own crafted neighbours (removed, scaled-up and cancellation records), and both checkers
against an optimizer that skips clipping: the suite's harness and the checker must flag it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ppml_fast.audit import check_sensitivity
from ppml_fast.privacy import DPOptimizer
from tests.privacy.sensitivity import test_hf as hf
from tests.privacy.sensitivity import test_layers as layers
from tests.privacy.sensitivity import test_sharing_loops as sharing
from tests.privacy.sensitivity._harness import Case, check_case


class SkipsClipping(DPOptimizer):
    """An attacker's (or a careless) subclass: sums the per-record gradients unclipped."""

    def clip_and_accumulate(self) -> None:
        sums, seen = self.module.clipped_sums(max_grad_norm=1e30, clipping="flat", step=self.steps)
        for p, s in sums.items():
            self._summed[p] = self._summed[p] + s if p in self._summed else s
        self._samples += seen


def _layer(name):
    kw = dict(layers.CASES[name])
    return kw["build"](), kw["inputs"], kw.get("target", layers._y()), kw.get("record_dim", 0) == 1, kw


CHECKED = [("layers", n) for n in ("linear_sequence", "conv1d", "embedding_repeated_tokens", "mha_cross",
                                   "encoder_seq_first", "torch_func_layer", "rows_not_records_pointnet")]
CHECKED += [("sharing", n) for n in ("tied_embedding_head", "module_called_twice", "checkpoint_nonreentrant",
                                     "parameter_used_outside_module", "lstmcell_unrolled")]


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("where,name", CHECKED)
def test_checker_on_suite_models(where, name, mode):
    src = layers.CASES if where == "layers" else sharing.CASES
    kw = dict(src[name])
    target = kw.get("target", torch.randint(0, 3, (int(kw["inputs"][0].shape[kw.get("record_dim", 0)]),),
                                            generator=torch.Generator().manual_seed(9)))
    extra = {"batch_first": False} if kw.get("batch_first") is False else {}
    for neighbours in ("remove", "replace"):
        report = check_sensitivity(kw["build"](), nn.functional.cross_entropy, (kw["inputs"], target),
                                   max_grad_norm=1.0, trials=3, neighbours=neighbours, grad_sample_mode=mode,
                                   **extra)
        if report.refused:
            assert kw.get("refuse_ok"), f"{name}[{mode}]: refused: {report.refused}"
            continue
        assert report.ok and report.max_ratio <= 1 + report.tol, f"{name}[{mode},{neighbours}]: {report}"


def test_checker_on_hf_gpt2():
    kw = hf.CASES["gpt2_tied_head"]

    def lm(out, labels):
        return nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                           labels[:, 1:].reshape(-1))

    report = check_sensitivity(kw["build"](), lm, (kw["inputs"], kw["target"]), max_grad_norm=1.0, trials=2)
    assert not report.refused and report.ok, str(report)


def test_both_checkers_flag_an_optimizer_that_skips_clipping():
    kw = dict(layers.CASES["linear_sequence"])
    case = Case(name="skips_clipping", target=layers._y(), make={"optimizer_class": SkipsClipping}, **kw)
    with pytest.raises(AssertionError, match="sensitivity"):
        check_case(case)
    report = check_sensitivity(kw["build"](), nn.functional.cross_entropy, (kw["inputs"], layers._y()),
                               max_grad_norm=1.0, trials=2, optimizer_class=SkipsClipping)
    assert not report.ok and report.max_ratio > 1.5, str(report)
