"""The registry the engine looks rules up in, and the mode switch."""

from __future__ import annotations

import pytest

from ppml_fast.privacy.per_sample import MODES, RULES, make_rules

OPS = {"linear", "linear_t", "conv1d", "conv2d", "conv3d", "embedding", "layer_norm", "group_norm",
       "instance_norm", "rms_norm"}


def test_every_op_has_an_auto_rule():
    assert set(RULES) == OPS
    assert all(rule.mode == "auto" for rule in RULES.values())


@pytest.mark.parametrize("mode", MODES)
def test_make_rules_sets_the_default_mode(mode):
    rules = make_rules(mode)
    assert set(rules) == OPS and all(rule.mode == mode for rule in rules.values())


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        make_rules("hooks")
